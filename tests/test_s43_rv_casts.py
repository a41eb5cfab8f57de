"""Review of session 43's weight casts (salience._core.casts.WeightCasts, the call's CastCache): the maps are those of
a call that lets autocast cast in every pass, and the call's copies do not outlive it."""
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience

X = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
CALLS = {
    "smoothgrad": lambda m, x, **kw: salience.smoothgrad(m, x, 1, samples=8, seed=0, **kw),
    "ig": lambda m, x, **kw: salience.integrated_gradients(m, x, 1, steps=8, **kw),
    "rise": lambda m, x, **kw: salience.rise(m, x, 1, masks=16, seed=0, **kw),
}


def _call(name: str, model: nn.Module, x: torch.Tensor = X, cached: bool = True) -> torch.Tensor:
    """The map under ``precision="bf16"`` in chunks of 2 items; ``cached=False``: autocast's cache off around the
    call (each pass's block inherits it, and the mode serves nothing): every pass casts every weight itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cached:
            return CALLS[name](model, x, chunk=2, precision="bf16")
        with torch.autocast("cpu", enabled=False, cache_enabled=False):
            return CALLS[name](model, x, chunk=2, precision="bf16")


class OutProduct(nn.Module):
    """A head that writes its matrix product into a tensor of its own (``out=``): autocast leaves such a call in
    fp32 (an ``out=`` overload is not on its list)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 5))

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3)).float()
        return torch.mm(h, self.w, out=torch.empty(h.shape[0], 5))


def test_a_product_with_out_runs_as_autocast_runs_it():
    """The merge handed ``torch.mm(h, w, out=...)`` a bf16 copy of ``w``: "expected m1 and m2 to have the same
    dtype" where autocast (and main) ran it in fp32. (A gradient-free method: ``out=`` takes no gradients.)"""
    model = OutProduct().eval()
    assert torch.equal(_call("rise", model), _call("rise", model, cached=False))


class Masked(nn.Module):
    """A conv whose pre-hook swaps in a scaled weight for the pass (``weight.data = ...``) and whose post-hook puts the
    original back (weight masking / pruning experiments): each pass's scaled tensor is new, and the allocator may
    give it the address of the previous pass's, freed by the restore."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)
        self.conv.register_forward_pre_hook(self._swap)
        self.conv.register_forward_hook(self._restore)

    passes = [0]  # a class attribute: the calls may run a copy of the model

    def _swap(self, mod, args):
        self.passes[0] += 1
        self.saved = mod.weight.data
        mod.weight.data = self.saved * (1 + self.passes[0] % 5)

    def _restore(self, mod, args, out):
        mod.weight.data = self.saved
        del self.saved

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("name", list(CALLS))
def test_a_weight_swapped_in_for_each_pass_is_cast_again(name):
    """The merge keyed a copy by the parameter's version, data pointer, strides and shape: a swapped-in tensor at the
    address of the previous pass's (freed) was served that tensor's stale copy."""
    model = Masked().eval()
    Masked.passes[0] = 0
    got = _call(name, model)
    n, Masked.passes[0] = Masked.passes[0], 0
    ref = _call(name, Masked().eval(), cached=False)
    assert Masked.passes[0] == n > 4
    assert torch.equal(got, ref)


class LateError(nn.Module):
    """Its head's product fails (a wrong width) at the fifth pass, inside the mode's handling of ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.head = nn.Linear(24, 5)

    passes = [0]  # a class attribute: the calls may run a copy of the model

    def forward(self, x):
        self.passes[0] += 1
        if self.passes[0] == 5:  # the head on the input's 3 channels: fails before the conv runs in this pass (whose
            return self.head(x.mean((2, 3)))  # graph would hold the conv's cast, as autocast's cast in main)
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


def _copies(shape) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 and list(o.shape) == list(shape))


@pytest.mark.parametrize("name", ["smoothgrad", "ig"])
def test_the_copies_do_not_outlive_a_call_that_failed(name):
    """The caller keeps the exception (a notebook's ``sys.last_value``): its traceback holds the mode's frame; the
    merge's copies (resnet50: 51 MB) stayed alive with it."""
    model = LateError().eval()
    shape = model.conv.weight.shape
    before, LateError.passes[0] = _copies(shape), 0
    with pytest.raises(Exception) as kept:
        _call(name, model)
    assert LateError.passes[0] >= 5 and kept.value is not None
    assert _copies(shape) == before


class Renewed(nn.Module):
    """A conv whose pre-hook sets a new ``nn.Parameter`` for each pass (``mod.weight = nn.Parameter(...)``): the
    module drops the previous one. Counts, after each pass, the dropped ones still alive."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 40, 3, padding=1)
        self.head = nn.Linear(40, 5)
        self.conv.register_forward_pre_hook(self._renew)

    dropped: list = []  # class attributes: the calls may run a copy of the model
    alive: list = []

    @classmethod
    def _renew(cls, mod, args):
        cls.dropped.append(weakref.ref(mod.weight))
        with torch.inference_mode(False):  # RISE's passes run in inference mode
            mod.weight = nn.Parameter(mod.weight.detach().clone(), requires_grad=False)

    def forward(self, x):
        out = self.head(F.relu(self.conv(x)).mean((2, 3)))
        # distinct objects: since session 50 the call's Found puts the found parameter back before each pass, so the
        # hook drops that same one each pass (one object, alive in Found's record); the renewed ones must go
        self.alive.append(len({id(r()) for r in self.dropped if r() is not None}))
        return out


def test_the_copies_of_parameters_dropped_during_a_call_are_freed():
    """The merge's entries held each parameter (so that its id is not reused) with its bf16 copy: a parameter renewed
    every pass kept every earlier one and its copy for the whole call (RISE of 16 masks, 2 images, chunks of 2: 15
    at the end); now an entry goes with its parameter."""
    Renewed.dropped.clear(), Renewed.alive.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        salience.rise(Renewed().eval(), X, 1, masks=16, seed=0, chunk=2, precision="bf16")
    assert len(Renewed.alive) > 10
    assert max(Renewed.alive) <= 3, Renewed.alive  # main: 3


class Standardized(nn.Parameter):
    """A user's parameter subclass that standardizes the weight where a convolution uses it (its own
    ``__torch_function__``, which torch runs after the modes)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.conv2d and isinstance(args[1], cls):
            w = args[1].as_subclass(torch.Tensor)
            w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
            args = (args[0], w, *args[2:])
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("name", ["ig", "rise"])
def test_a_parameter_subclass_is_left_to_autocast(name):
    """The merge served the subclass a bf16 copy: its standardization ran on bf16 values (autocast's runs on the fp32
    ones and casts the result), a map 0.02 off on this model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    model[0].weight = Standardized(model[0].weight.data)
    assert torch.equal(_call(name, model), _call(name, model, cached=False))
