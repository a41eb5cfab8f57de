"""Review of perf.Run.casts_kept (session 42): autocast's kept weight casts never outlive the call, inside a caller's
own ``torch.autocast`` block too, and a Ctrl-C as the call leaves (at ``calmly``'s start, before it defers the
signal) still closes the nesting and turns the folded copy's ``requires_grad`` back off."""
import warnings

import pytest
import torch
from torch import nn

import salience


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


X = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
CALLS = {
    "scorecam": lambda m: salience.scorecam(m, X, 1, layer=m[0], chunk=2, precision="bf16"),
    "ablationcam": lambda m: salience.ablationcam(m, X, 1, layer=m[0], chunk=2, precision="bf16"),
    "rise": lambda m: salience.rise(m, X, 1, masks=16, chunk=2, precision="bf16", seed=0),
    "occlusion": lambda m: salience.occlusion(m, X, 1, window=6, stride=6, chunk=2, precision="bf16"),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_weights_loaded_anew_inside_a_callers_autocast_block_are_the_ones_used(name):
    """A caller's ``with torch.autocast(...)`` around two calls, the weights loaded in place between them
    (``load_state_dict``, as when comparing checkpoints): the second map is the one of the new weights. The block's
    nesting kept autocast's cache past the first call (its exit closed its own nesting only, not back to 0), and the
    second call's parameters, requiring gradients again, were looked up there: the old weights' bf16 copies."""
    model, other = _model(0), _model(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CALLS[name](other)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            CALLS[name](model)
            model.load_state_dict(other.state_dict())
            got = CALLS[name](model)
    assert torch.equal(got, ref)


def _nesting() -> int:
    n = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return n


def test_ctrl_c_in_a_pass_leaves_no_casts_and_no_gradients_on(monkeypatch):
    """A Ctrl-C (``KeyboardInterrupt``) inside a pass of a folded Score-CAM call: no autocast nesting left open, the
    folded copy's parameters (kept for the model's next calls) without gradients, the model's as before, and the
    next call's map the same. (Session 42 tested a Ctrl-C at ``calmly``'s start in ``casts_kept``'s exit; since
    session 43 that exit only drops the call's cache: nothing of the model or of autocast is changed.)"""
    model = _model()
    with warnings.catch_warnings(), salience.performance(fold_batchnorm=True):
        warnings.simplefilter("ignore")
        ref = CALLS["scorecam"](model)
        from salience._core.folding import _folded
        copies = [p for f in _folded.values() for m in f if isinstance(m, nn.Module) for p in m.parameters()]
        calls = []

        def interrupt(*_):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt

        hooks = [m.register_forward_hook(interrupt) for f in _folded.values() for m in f
                 if isinstance(m, nn.Module)]
        with pytest.raises(KeyboardInterrupt):
            CALLS["scorecam"](model)
        for h in hooks:
            h.remove()
        assert _nesting() == 0
        assert copies and not any(p.requires_grad for p in copies)
        assert all(p.requires_grad for p in model.parameters())
        assert torch.equal(CALLS["scorecam"](model), ref)
