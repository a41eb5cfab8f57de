"""The process's performance settings on the attention methods (attention rollout, transformer attribution).

``precision`` is applied (autocast around the pass; the capture forms ``A`` from the autocast logits and the map is
computed in float32 from it) and ``memory_format="channels_last"`` too (the model's 4-D parameters and the input:
a token model's patch embedding, a hybrid's backbone); ``compile`` and ``fold_batchnorm`` cannot be (the capture is a
torch function mode entered by hooks on the model's own attention modules) and a warning says so once per process
and option, at the user's line. Before, all four were ignored without a word.

Tolerances (bf16 on CPU, relative L2 per image against the float32 map, a fixed class, 0 or 1), measured by
:func:`measure` over 20 seeds x 4 images x 2 classes (torchvision's ViT, 2 layers, 2 heads, dim 16, 32 px;
tests/tiny_vit.py with its three attention kernels, 4 layers, 4 heads, dim 32): rollout at most 1.5e-3 (median 3e-4
to 8e-4); attribution median 2.2e-3 to 6.5e-3, at most 4.7e-3 on tests/tiny_vit.py, but 0.18 on one torchvision draw
(two of its 160 maps above 0.1, correlation 0.9915 still: the ReLU of ``dS/dA * A`` takes entries near 0 in or out
as their bf16 rounding flips their sign). Tested bounds: rollout 1e-2; attribution 0.25 and a correlation of at least 0.98 (the model drawn here
gives 5e-3). With ``target=None`` a near-tie of the two top classes (8.95 against 8.88) may flip the predicted class
under bf16: another class's map, as for every method. The figures: ``PYTHONPATH=src python tests/test_s39_attnperf_transformer.py`` (:func:`measure`).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience.attention import capturing
from salience.methods import _multi
from conftest import unchanged
from tiny_vit import TinyViT, torchvision_vit

METHODS = {"attention_rollout": salience.attention_rollout, "transformer_attribution": salience.transformer_attribution}
TOLERANCE = {"attention_rollout": 1e-2, "transformer_attribution": 0.25}


@pytest.fixture(autouse=True)
def fresh_warnings():
    _multi._UNAPPLIED.clear()
    yield
    _multi._UNAPPLIED.clear()


def _models() -> dict:
    torch.manual_seed(0)
    return {"torchvision": torchvision_vit(),
            **{kind: TinyViT(size=(32, 32), patch=8, dim=32, heads=4, depth=3).eval().set_attention(kind)
               for kind in ("mha", "sdpa", "explicit")}}


def _x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 3, 32, 32)


def _conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.mark.parametrize("kind", ["torchvision", "mha", "sdpa", "explicit"])
@pytest.mark.parametrize("name", list(METHODS))
def test_precision_set_for_the_process_runs_the_attention_pass_under_autocast(name, kind):
    m, x = _models()[kind], _x()
    ref = METHODS[name](m, x, 1)
    seen: list = []
    handle = _conv(m).register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    try:
        with unchanged(m):
            prev = salience.set_performance(precision="bf16")
            try:
                got = METHODS[name](m, x, 1)
            finally:
                salience.set_performance(**vars(prev))
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}  # was float32: the setting silently not applied
    assert got.dtype == torch.float32 and got.shape == ref.shape and not torch.equal(got, ref)
    assert _rel(got, ref).max() <= TOLERANCE[name]
    assert min(_corr(a, b) for a, b in zip(got, ref)) >= 0.98


@pytest.mark.parametrize("name", list(METHODS))
def test_channels_last_set_for_the_process_lays_out_the_patch_embedding(name):
    m, x = _models()["sdpa"], _x()
    ref = METHODS[name](m, x, 1)
    layouts: list = []
    handle = _conv(m).register_forward_pre_hook(
        lambda mod, i: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        with unchanged(m), salience.performance(memory_format="channels_last"):
            got = METHODS[name](m, x, 1)
    finally:
        handle.remove()
    assert layouts and all(layouts)  # was contiguous
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("option", [{"compile": True}, {"fold_batchnorm": True}])
def test_an_option_not_applied_is_said_once_at_the_users_line(name, option):
    m, x = _models()["mha"], _x()
    ref = METHODS[name](m, x, 1)
    (key, value), = option.items()
    prev = salience.set_performance(**option)
    try:
        with pytest.warns(UserWarning, match=rf"^{name}: {key}={value!r} is not applied to its passes: the attention "
                                             "capture") as record:
            got = METHODS[name](m, x, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process: not again
            again = METHODS[name](m, x, 1)
    finally:
        salience.set_performance(**vars(prev))
    assert [w.filename for w in record if key in str(w.message)] == [__file__]  # the user's line, one warning
    assert torch.equal(got, ref) and torch.equal(again, ref)  # the passes ran as without the option


def test_defaults_say_nothing():
    m, x = _models()["mha"], _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for f in METHODS.values():
            f(m, x, 1)


@pytest.mark.parametrize("kind", ["torchvision", "mha", "sdpa", "explicit"])
def test_the_capture_forms_attention_right_under_bf16_autocast(kind):
    """What the capture records under CPU bf16 autocast is the attention of the autocast pass: the softmax of the
    bf16 logits (CPU autocast keeps the softmax in its input's dtype), rows summing to 1 within bf16's rounding, within
    a few bf16 units of the float32 matrices; and the output the capture computes equals the model's own under the
    same autocast (its fused kernel) within bf16 tolerance."""
    m, x = _models()[kind], _x()
    with torch.no_grad(), capturing(m, batch=x.shape[0]) as cap:
        m(x)
    ref = cap.maps
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        own = m(x).float()
        with capturing(m, batch=x.shape[0]) as cap:
            out = m(x).float()
    assert len(cap.maps) == len(ref) == (2 if kind == "torchvision" else 3)
    for a, r in zip(cap.maps, ref):
        assert a.shape == r.shape
        a = a.float()
        assert (a.sum(-1) - 1).abs().max() <= 2 ** -6
        assert (a - r).abs().max() <= 2 ** -5
    assert ((out - own).norm() / own.norm()) <= 2e-2


def test_default_methods_tries_rollout_without_a_word_of_the_settings():
    """``default_methods`` runs attention rollout once on an image to learn whether it takes the model: a probe, run
    with the default options (``perf.plain``), which says nothing of the process's settings; the user's own call
    of the method says it, once."""
    m, x = _models()["mha"], _x()
    prev = salience.set_performance(compile=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            names = salience.methods.default_methods(m, x)
        assert "attention_rollout" in names
        with pytest.warns(UserWarning, match=r"^attention_rollout: compile=True is not applied"):
            salience.attention_rollout(m, x, 1)
    finally:
        salience.set_performance(**vars(prev))


def measure(seeds: int = 20) -> dict:
    """Per method and model: the median and largest relative L2 distance per image of the bf16 map (CPU autocast) to
    the float32 map, and the smallest correlation, with a fixed class (0 and 1), over ``seeds`` draws of each model
    and of 4 images: the figures of the module doc."""
    from statistics import median

    from torchvision.models.vision_transformer import VisionTransformer

    seen: dict = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        tv = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                               num_classes=5).eval()
        nn.init.normal_(tv.heads.head.weight)
        models = {"torchvision": tv, **{k: TinyViT(size=(32, 32), patch=8, dim=32, heads=4, depth=4).eval()
                                        .set_attention(k) for k in ("mha", "sdpa", "explicit")}}
        x = torch.rand(4, 3, 32, 32)
        for kind, m in models.items():
            for name, f in METHODS.items():
                for target in (0, 1):
                    ref = f(m, x, target)
                    with salience.performance(precision="bf16"):
                        got = f(m, x, target)
                    rel, corr = seen.setdefault((name, kind), ([], []))
                    rel.extend(_rel(got, ref).tolist())
                    corr.extend(_corr(a, b) for a, b in zip(got, ref))
    return {key: (median(rel), max(rel), min(corr)) for key, (rel, corr) in seen.items()}


if __name__ == "__main__":
    print("method                   model        median L2  max L2    min corr")
    for (name, kind), (med, worst, corr) in sorted(measure().items()):
        print(f"{name:24s} {kind:12s} {med:.2e}   {worst:.2e}  {corr:.4f}")
