"""Session 49 review of ``perturbation.Found`` (the model's own state put back before each pass of occlusion, RISE,
Score-CAM and Ablation-CAM), after the model guard learnt (same session, "record49") to put back the contents of list,
dict and set attributes and inference-tensor attributes written in place. Each test fails on main before this review:

a) Found recorded no container's contents: occlusion's window ``k`` saw the list window ``k - 1``'s pass appended to,
   which the call's end then undid (the guard's own put-back);
b) Found recorded an inference-tensor attribute by identity only: one written in place under inference mode was seen
   by the next pass;
c) a plain tensor attribute over the guard's 1 MiB, which Found copies and put back, drew the guard's warning that
   "it keeps those values" (it did not).

References are hand-written Zeiler & Fergus occlusion (test_s49_occlusion_state) with the state put back by hand
before every forward.
"""
import warnings

import pytest
import torch

import salience
from test_s49_occlusion_state import SIZE, Big, Replaced, _model, _occlusion_reference, _rise_reference, _same_state


class Listed(Replaced):
    """The state in a list and a dict changed in place (``self.hist.append``): every pass after the first adds 1."""

    def __init__(self) -> None:
        super().__init__()
        self.hist: list = []
        self.notes: dict = {}

    def get_state(self):
        return torch.tensor([float(len(self.hist)), float(len(self.notes))])

    def set_state(self, s):
        del self.hist[int(s[0]):]
        self.notes.clear()
        self.notes.update({i: i for i in range(int(s[1]))})

    def forward(self, x):
        z = torch.relu(self.conv2(torch.relu(self.conv(x)))).mean((2, 3)) + len(self.hist) + 0.5 * len(self.notes)
        self.hist.append(0)
        self.notes[len(self.notes)] = 0
        return self.fc(z)


class InferenceInPlace(Replaced):
    """The state an inference tensor (the user ran the model under ``torch.inference_mode()``) written in place,
    under inference mode, by each forward."""

    def get_state(self):
        return self.h.clone()

    def set_state(self, s):
        with torch.inference_mode():
            self.h.copy_(s)

    def forward(self, x):
        z = torch.relu(self.conv2(torch.relu(self.conv(x)))).mean((2, 3)) + 3 * self.h
        if self.h.is_inference():
            with torch.inference_mode():
                self.h.copy_(z.detach().mean(0))
        return self.fc(z)


def _check_occlusion(m, x, state, local, chunk):
    """Occlusion (window 4, stride 4) at classes 1 and 2 against Zeiler & Fergus with the state put back by hand."""
    target = torch.tensor([1, 2])
    want = _occlusion_reference(m, x, target, 4, 4, state)
    m.set_state(state)
    got = salience.occlusion(m, x, target, window=4, stride=4, chunk=chunk, local=local)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("local", [True, False])
def test_occlusion_container_state(local):
    m, x = _model(Listed)
    hist, notes = m.hist, m.notes
    state = m.get_state()
    _check_occlusion(m, x, state, local, 5)
    _same_state(m, state)
    assert m.hist is hist and m.notes is notes  # the user's objects, put back in place


def test_rise_container_state():
    """RISE (Petsiuk et al.): sum_i S(x * M_i) M_i / (N p), S the class probability, the state put back before each."""
    m, x = _model(Listed)
    state = m.get_state()
    target = torch.tensor([1, 3])
    n, p = 8, 0.5
    want = _rise_reference(m, x, target, n, p, state)
    m.set_state(state)
    got = salience.rise(m, x, target, masks=n, cell=4, p=p, seed=3, chunk=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _same_state(m, state)


@pytest.mark.parametrize("local", [True, False])
def test_occlusion_inference_state_written_in_place(local):
    m, x = _model(InferenceInPlace, warm=False)
    with torch.inference_mode():
        m.h = torch.zeros(8)
        m(torch.randn(2, 3, SIZE, SIZE))
    h = m.h
    assert h.is_inference() and h.abs().sum() > 0
    state = h.clone()
    _check_occlusion(m, x, state, local, 4)
    assert m.h is h and torch.equal(h, state)


def test_no_warning_for_a_large_tensor_put_back():
    """The guard copies no tensor over 1 MiB and would say it stays written; Found put it back: no warning."""
    m, x = _model(Big, warm=False)
    state = m.get_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        salience.occlusion(m, x, torch.tensor([1, 2]), window=4, stride=4, local=False, chunk=5)
    _same_state(m, state)


class Folded(Replaced):
    """:class:`Replaced` with a batch norm after its first convolution (``fold_batchnorm`` folds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        z = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x))))).mean((2, 3)) + 3 * self.h
        self.h = z.detach().mean(0)
        return self.fc(z)


def test_fold_batchnorm_traces_the_state_found():
    """The folded copy (a trace, which bakes the state it reads in) was made after the clean pass, with the state that
    pass left: every pass of occlusion's full passes and RISE ran that state."""
    m, x = _model(Folded)
    h, state = m.h, m.h.clone()
    target = torch.tensor([1, 2])
    want = _occlusion_reference(m, x, target, 4, 4, state)
    n, p = 6, 0.5
    rise_want = _rise_reference(m, x, target, n, p, state)
    m.h = h
    with salience.performance(fold_batchnorm=True):
        got = salience.occlusion(m, x, target, window=4, stride=4, chunk=5, local=False)
        _same_state(m, state, h)
        rise_got = salience.rise(m, x, target, masks=n, cell=4, p=p, seed=3, chunk=4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rise_got, rise_want, rtol=1e-4, atol=1e-5)
    _same_state(m, state, h)


class Raises(Replaced):
    """A list over the guard's 1024 items that each forward appends to, and a failure on its fourth forward."""

    def __init__(self) -> None:
        super().__init__()
        self.hist = list(range(2000))

    forwards = [0]  # on the class: no state of the model's (nothing puts it back)

    def forward(self, x):
        self.hist.append(len(self.hist))
        self.forwards[0] += 1
        if self.forwards[0] == 4:
            raise RuntimeError("the fourth forward fails")
        return super().forward(x) + len(self.hist)


def test_exception_mid_call_puts_back_a_large_list():
    """The call fails part way: the model comes back with the user's state, a list over the model guard's 1024 items
    too (Found copies every container, as every tensor; the guard alone keeps its length only and says it stays)."""
    m, x = _model(Raises, warm=False)
    Raises.forwards[0] = 0
    hist, h = m.hist, m.h
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="fourth forward"):
            salience.occlusion(m, x, torch.tensor([1, 2]), window=4, stride=4, local=False, chunk=1)
    assert m.hist is hist and hist == list(range(2000)) and m.h is h


def test_a_loaded_torchscript_model(tmp_path):
    """A model loaded with torch.jit.load (its buffers behind TorchScript's wrappers, no plain dicts): RISE failed with
    "'OrderedDictWrapper' object has no attribute 'get'" (Found's record of it); now as an eager copy's map."""
    m, x = _model(Folded, warm=False)
    plain = torch.nn.Sequential(m.conv, m.bn, torch.nn.ReLU(), m.conv2, torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), m.fc).eval()
    torch.jit.save(torch.jit.script(plain), str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    got = salience.rise(loaded, x, 1, masks=4, cell=4, seed=3)
    torch.testing.assert_close(got, salience.rise(plain, x, 1, masks=4, cell=4, seed=3), rtol=1e-5, atol=1e-6)


def test_state_a_hook_sets_on_a_torch_nn_layer():
    """A forward hook on a torch.nn layer that keeps a count on the layer and adds it to the output: the model guard
    puts the layer's attributes back after the call, so each pass must see them as found (window k saw k - 1's)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()

    def hook(m, i, o):
        n = m.__dict__.get("count", 0)
        m.count = n + 1
        return o + n

    handle = net[4].register_forward_hook(hook)
    x = torch.randn(1, 3, 8, 8)

    def score(xx):  # Zeiler & Fergus's score, the count as found (none) before every forward
        net[4].__dict__.pop("count", None)
        return net(xx)[0, 1]

    with torch.no_grad():
        s, want = score(x), torch.zeros(8, 8)
        for y0, x0 in ((0, 0), (0, 4), (4, 0), (4, 4)):
            xo = x.clone()
            xo[:, :, y0:y0 + 4, x0:x0 + 4] = 0
            want[y0:y0 + 4, x0:x0 + 4] = s - score(xo)
    net[4].__dict__.pop("count", None)
    try:
        got = salience.occlusion(net, x, 1, window=4, stride=4, local=False)
    finally:
        handle.remove()
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    assert "count" not in net[4].__dict__
