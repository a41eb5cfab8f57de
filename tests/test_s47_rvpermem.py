"""Session 47's review of Ablation-CAM's float32 clean pass run as two (scorecam._clean_apart, tests/test_s47_permem.py).

The second pass ends at the layer by an exception raised in a forward hook. Two ways it went wrong on 05888f1:

* a model whose forward catches ``Exception``: one that raises it again as its own error (``raise RuntimeError(...)
  from e``) made Ablation-CAM fail where the one pass ran; one that swallows it (an optional step it guards) ran the
  layers after the layer on the kept output, which they changed in place: the map of other activations;
* an inference tensor ``x`` (the call under ``torch.inference_mode()``) keeps no version counter, so a model that
  changed its input in place in the first pass was not told and the second ran on the input changed once more.

Each is now the one pass of :func:`salience.methods.scorecam._capture` (as before session 47); the maps are the
paper's formula by hand.
"""
import torch
import torch.nn as nn

import salience
from test_s47_permem import InPlaceInput, _ablation_reference  # x -= 0.5 in its forward


def _x(b: int = 3, s: int = 8) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(1))


def _reference(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """The paper's formula by hand (tests/test_s47_permem.py), ``(B, H, W)``, the layer's output as it returned it."""
    return _ablation_reference(model, layer, x, torch.full((x.shape[0],), target), copy=True)


class RaisesItsOwn(nn.Module):
    """A forward that reports any failure as its own error (the model's context added), the cause chained."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.net(x)
        except Exception as e:
            raise RuntimeError("the model failed on this batch") from e


def test_ablationcam_of_a_model_that_raises_errors_as_its_own_is_the_papers_map():
    """05888f1: RuntimeError("the model failed on this batch") out of the stopped pass (the one pass ran)."""
    model, x = RaisesItsOwn().eval(), _x()
    hooks = len(model.net[2]._forward_hooks)
    got = salience.ablationcam(model, x, 1, layer="net.2")
    assert len(model.net[2]._forward_hooks) == hooks  # the stop's hook taken off
    ref = _reference(model, model.net[2], x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


class SwallowsErrors(nn.Module):
    """An in-place activation guarded by ``except Exception`` (its output is its input: the pass goes on with it),
    then a step that changes it in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        try:
            h = self.act(h)
        except Exception:
            pass
        h.mul_(2.0)
        return self.fc(h.mean((2, 3)))


def test_ablationcam_of_a_model_that_swallows_the_stop_reads_the_layers_own_output():
    """05888f1: the stop swallowed, the pass went on and doubled the kept output in place: a map of twice the
    activations (0.34 off)."""
    model, x = SwallowsErrors().eval(), _x()
    got = salience.ablationcam(model, x, 1, layer="act")
    assert not model.act._forward_hooks
    ref = _reference(model, model.act, x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_ablationcam_under_inference_mode_of_a_model_that_changes_its_input_takes_both_from_one_pass():
    """``x -= 0.5`` in the forward, ``x`` an inference tensor (no version counter: the change cannot be told): the
    layer's output and S from one pass, the layer's output the conv of that pass's input, the input changed once by
    it, as before session 47. 05888f1: a second pass of all the images, stopped at the layer, on the input changed
    once more (the map 0.07 off)."""
    model, x = InPlaceInput().eval(), _x(2)
    seen: list = []
    hooks = [model.conv.register_forward_pre_hook(lambda m, a: seen.append(("in", a[0].clone()))),
             model.conv.register_forward_hook(lambda m, a, o: seen.append(("out", o.clone()))),
             model.head.register_forward_pre_hook(lambda m, a: seen.append(("head", None)))]
    try:
        with torch.inference_mode():
            xi = x.clone()
            got = salience.ablationcam(model, xi, 1, layer="conv", upsample=False)
    finally:
        for h in hooks:
            h.remove()
    kinds = [k for k, _ in seen]
    assert kinds[:3] == ["in", "out", "head"] and seen[0][1].shape[0] == 2, kinds[:6]
    passes = "".join(k[0] for k in kinds).split("i")[1:]  # each pass: "o" (the layer returned) then "h" (the head)
    assert all(p == "oh" for p in passes), kinds[:8]  # no pass stopped at the layer: the one clean pass gave both
    torch.testing.assert_close(seen[0][1], x - 0.5, rtol=0, atol=0)  # the input as the one pass changed it
    with torch.no_grad():
        torch.testing.assert_close(seen[1][1], model.conv(x - 0.5), rtol=0, atol=0)
    assert torch.isfinite(got).all()
