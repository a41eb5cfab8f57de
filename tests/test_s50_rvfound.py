"""Session 50 review of ``guard.Found`` (session 50's "found": the record compared as whole lists in C each pass, the
changed modules alone put back).

- A ``Counter`` of tensors (``self.totals.update(feat=z)``: a Counter's missing key counts 0, so it sums tensors too)
  whose tensor a pass replaced made ``Found.before_pass`` raise "Boolean value of Tensor with more than one value is
  ambiguous": its Counters were compared with ``dict.__eq__`` outside any ``try`` (the other containers' comparisons
  catch an item's ``==`` raising). The call failed; before session 50 the same model was explained.
- A parameter or submodule a forward replaces, adds or removes (``self.w = nn.Parameter(...)``, a head swapped, a
  layer made on the first call) stayed between the passes (session 49's record compared neither, nor does the merged
  one): each pass saw what the pass before left, which the model guard puts back only when the call ends. ``Found``
  now keeps them by name as the model guard does.
- A TorchScript module's number, flag or string attribute assigned by a method TorchScript leaves to Python
  (``@torch.jit.ignore``: no ``prim::SetAttr`` in any graph) was not read (only the assigned names were): each pass
  saw the count the pass before left, and the call left it. Every such attribute is now read where a method calls
  Python (``prim::PythonOp``).

Each checked against Zeiler & Fergus's occlusion written out with the state put back before every forward.
"""
import warnings
from collections import Counter

import torch
from torch import nn

import salience
from salience._core.guard import Found, model_guard
from test_s49_occlusion_state import SIZE
from test_s50_found import _occlusion_reference  # Zeiler & Fergus's, reset() before every forward


class Totals(nn.Module):
    """A running total of the pooled features kept in a Counter (a tensor as a count), read by the next call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.totals = Counter()

    def forward(self, x):
        z = torch.relu(self.conv(x)).mean((2, 3))
        z = z + 0.5 * self.totals["feat"]
        self.totals.update(feat=z.detach().mean(0))  # Counter.update sums: a new tensor in the Counter's slot
        return self.fc(z)


def test_counter_of_tensors_put_back_before_each_pass():
    torch.manual_seed(0)
    m = Totals().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        m(torch.randn(2, 3, SIZE, SIZE))  # the user's own call: a tensor in the Counter
    feat = m.totals["feat"]

    def reset():
        m.totals["feat"] = feat

    target = torch.tensor([1, 2])
    want = _occlusion_reference(m, x, target, 4, 4, reset)
    reset()
    got = salience.occlusion(m, x, target, window=4, stride=4, chunk=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert m.totals["feat"] is feat and list(m.totals) == ["feat"]


class Swapping(nn.Module):
    """A forward that replaces its own parameter, swaps two heads and makes a layer on its first call (its weights
    from how many it made): each read by the next call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.head = nn.Linear(8, 4)
        self.alt = nn.Linear(8, 4)

    def forward(self, x):
        z = torch.relu(self.conv(x)).mean((2, 3)) * self.scale
        if "shift" not in self._modules:  # made lazily: a pass that finds it made by the pass before skips this
            self.shift = nn.Linear(8, 8)
            with torch.no_grad():
                self.shift.weight.copy_(torch.eye(8))
                self.shift.bias.fill_(0.25)
            z = self.shift(z)
        self.scale = nn.Parameter(self.scale.detach() * 1.5)
        y = self.head(z)
        self.head, self.alt = self.alt, self.head
        return y


def test_parameters_and_submodules_put_back_before_each_pass():
    torch.manual_seed(0)
    m = Swapping().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    scale, head, alt = m.scale, m.head, m.alt
    names = list(m._modules)

    def reset():
        m._modules.pop("shift", None)
        m.scale, m.head, m.alt = scale, head, alt

    def same():
        assert m.scale is scale and m.head is head and m.alt is alt and list(m._modules) == names

    target = torch.tensor([0, 3])
    want = _occlusion_reference(m, x, target, 4, 4, reset)
    reset()
    got = salience.occlusion(m, x, target, window=4, stride=4, chunk=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    same()
    with model_guard(m), Found(m) as found:  # each kind of change alone, put back before the next pass
        for change in (lambda: setattr(m, "scale", nn.Parameter(torch.ones(8))),
                       lambda: setattr(m, "extra", nn.Linear(2, 2)), lambda: delattr(m, "alt"),
                       lambda: setattr(m, "head", m.alt)):
            change()
            found.before_pass()
            same()


class Calls(nn.Module):
    """A scripted forward that counts its calls in a method TorchScript leaves to Python (``@torch.jit.ignore``: no
    ``prim::SetAttr`` in any graph, the write made from Python), the count read by the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.calls = 0

    @torch.jit.ignore
    def count(self) -> int:
        self.calls = self.calls + 1
        return self.calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(z + 0.25 * float(self.count()))


def test_scripted_attribute_written_from_python_put_back_before_each_pass():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation
        m = torch.jit.script(Calls().eval())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        m(x)  # the user's own call: a count of their own
    calls = m.calls

    def reset():
        m.calls = calls

    target = torch.tensor([1, 2])
    want = _occlusion_reference(m, x, target, 4, 4, reset)
    reset()
    got = salience.occlusion(m, x, target, window=4, stride=4, chunk=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert m.calls == calls
