"""Every model kind x method x option works or raises a :class:`SalienceError` saying what to do (session 55).

The guide's promise, checked as a cross product: each model kind (:data:`KINDS`: a plain CNN, torchvision's
resnet18 and ViT, a timm Swin (channels-last stages), a Hugging Face ViT (a ``ModelOutput``), TorchScript (scripted
and traced), a ``torch.export`` program loaded from its ``.pt2`` by :func:`salience.load_model`, models returning a
tuple / a dict read with ``output=``, a one-output regression model, a model in train mode with BatchNorm and
Dropout, a model with frozen parameters, a grayscale model) x every method of :data:`salience.METHODS` x the
options of :func:`cells` (target ``None`` / an int / a list of two, each ``reduce=``, ``layer=`` default and named,
and each method's documented options at one non-default value). Every cell either gives a finite map of the
documented shape or raises a :class:`SalienceError` (never a raw ``TypeError`` / ``RuntimeError`` / ...), and the
model comes back exactly as it was (``conftest.unchanged``) in both cases. :data:`REFUSED` lists the cells that
refuse, each with its reason and a part of the message: a cell that starts or stops refusing fails.

Cheap options keep it fast: SmoothGrad 2 samples, integrated gradients 2 steps, RISE 4 masks, occlusion's window
half the image; every model tiny with random weights, 16-32 px, built once per module.
"""
from __future__ import annotations

import inspect
import logging
import math
import re
import warnings
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience.loading.custom import select_output
from conftest import SmallCNN, seeded_small_cnn, unchanged

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")
transformers.logging.set_verbosity_error()
logging.getLogger("timm").setLevel(logging.ERROR)

B = 2


# ------------------------------------------------------------------------------------------------ model kinds


class _Pair(nn.Module):
    """SmallCNN's scores and an auxiliary output, as a tuple or as a dict: read with ``output=``."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.net = seeded_small_cnn().eval()
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.net(x)
        aux = logits.sum(1, keepdim=True)
        return {"aux": aux, "logits": logits} if self.as_dict else (logits, aux)


class _Regressor(nn.Module):
    """One output per image, ``(B, 1)``: a regression model."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _cnn() -> nn.Module:
    return seeded_small_cnn().eval()


def _frozen() -> nn.Module:
    model = _cnn()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _gray() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(c=1).eval()


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


def _tv_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=4).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zeroes the head: every score 0, every gradient 0
    return model


def _swin() -> nn.Module:
    torch.manual_seed(0)
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                           num_classes=4).eval()


def _hf_vit() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=1, hidden_size=16,
                                 num_attention_heads=2, intermediate_size=32, num_labels=4)
    return transformers.ViTForImageClassification(cfg).eval()


def _scripted() -> nn.Module:
    return torch.jit.script(_cnn())


def _traced() -> nn.Module:
    return torch.jit.trace(_cnn(), torch.rand(B, 3, 16, 16))


def _exported(tmp: Any) -> nn.Module:
    model = _cnn()
    program = torch.export.export(model, (torch.rand(B, 3, 16, 16),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    path = tmp / "cnn.pt2"
    torch.export.save(program, path)
    return salience.load_model(path)


def _train() -> nn.Module:
    return seeded_small_cnn().train()


# name: (builder, channels, size, a named layer)
KINDS: dict[str, tuple[Callable[..., nn.Module], int, int, str]] = {
    "cnn": (_cnn, 3, 16, "features.3"),
    "resnet18": (_resnet, 3, 32, "layer2"),
    "tv_vit": (_tv_vit, 3, 32, "encoder.layers.encoder_layer_0"),
    "timm_swin": (_swin, 3, 32, "layers.0"),
    "hf_vit": (_hf_vit, 3, 32, "vit.layers.0"),
    "scripted": (_scripted, 3, 16, "features.3"),
    "traced": (_traced, 3, 16, "features.3"),
    "exported": (_exported, 3, 16, "features.3"),
    "tuple": (lambda: select_output(_Pair(False), 0), 3, 16, "net.features.3"),
    "dict": (lambda: select_output(_Pair(True), "logits"), 3, 16, "net.features.3"),
    "regression": (_Regressor, 3, 16, "features.2"),
    "train_mode": (_train, 3, 16, "features.3"),
    "frozen": (_frozen, 3, 16, "features.3"),
    "grayscale": (_gray, 1, 16, "features.3"),
}

_BUILT: dict[str, nn.Module] = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], nn.Module]:
    def get(kind: str) -> nn.Module:
        if kind not in _BUILT:
            builder = KINDS[kind][0]
            _BUILT[kind] = builder(tmp_path_factory.mktemp("pt2")) if kind == "exported" else builder()
        return _BUILT[kind]
    return get


def image(kind: str) -> torch.Tensor:
    _, c, size, _ = KINDS[kind]
    return torch.rand(B, c, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ option cells

CHEAP: dict[str, dict[str, Any]] = {"smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 2},
                                    "rise": {"masks": 4}}

_TOKENS = {"strip_softmax": False, "grid": (4, 4), "prefix_tokens": 1}
_ENGINE = {"chunk": 1, "max_memory": "1GB", "progress": True, "memory_format": "channels_last", "precision": "bf16"}

# each method's documented options, one non-default value each (reduce, layer and target are added by cells())
OPTIONS: dict[str, dict[str, Any]] = {
    "vanilla": {"grad_modifier": "absolute", "strip_softmax": False},
    "guided_backprop": {"grad_modifier": "relu", "unsupported": "ignore", "strip_softmax": False},
    "deconvnet": {"grad_modifier": "negate", "unsupported": "ignore", "strip_softmax": False},
    "gradcam": {"upsample": False, "relu": False, **_TOKENS},
    "guided_gradcam": {"grad_modifier": "absolute", "unsupported": "ignore", **_TOKENS},
    "gradcam_plus_plus": {"upsample": False, "relu": False, **_TOKENS},
    "hirescam": {"upsample": False, "relu": False, **_TOKENS},
    "xgradcam": {"upsample": False, "relu": False, **_TOKENS},
    "layercam": {"upsample": False, "relu": False, "gamma": 1.0, **_TOKENS},
    "eigencam": {"upsample": False, "center": True, "grid": (4, 4), "prefix_tokens": 1},
    "smoothgrad": {"method": salience.guided_backprop, "noise": 0.3, "variant": "vargrad", "seed": [1, 2],
                   "grad_modifier": "absolute", "reduce_each": True, "strip_softmax": False, **_ENGINE},
    "integrated_gradients": {"baseline": "blur", "rule": "gausslegendre", "return_gap": True, "blur_sigma": 2.0,
                             "grad_modifier": "absolute", "strip_softmax": False, **_ENGINE},
    "input_x_gradient": {"grad_modifier": "absolute", "strip_softmax": False},
    "scorecam": {"softmax": "none", "relu": False, "upsample": False, "align_corners": True, **_TOKENS, **_ENGINE},
    "ablationcam": {"value": 1.0, "softmax": "auto", "relu": False, "upsample": False, **_TOKENS, **_ENGINE},
    "occlusion": {"stride": 4, "baseline": "blur", "softmax": "auto", "local": False, "strip_softmax": False,
                  **_ENGINE},
    "rise": {"cell": 4, "p": 0.3, "seed": None, "softmax": "none", "strip_softmax": False, **_ENGINE},
    "attention_rollout": {"head_fusion": "max", "discard_ratio": 0.5, "upsample": False, "grid": (4, 4),
                          "prefix_tokens": 1},
    "transformer_attribution": {"upsample": False, "strip_softmax": False, "grid": (4, 4), "prefix_tokens": 1},
}

# options that go together (label, keywords), on every kind
COMBINED: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "integrated_gradients": [("baseline='blur',blur_sigma=2.0", {"baseline": "blur", "blur_sigma": 2.0}),
                             ("baseline='blur',blur_sigma='2'", {"baseline": "blur", "blur_sigma": "2"}),
                             ("baseline='blur',blur_sigma=inf", {"baseline": "blur", "blur_sigma": math.inf}),
                             ("baseline=1e308", {"baseline": 1e308})],
    "occlusion": [("baseline=1e308", {"baseline": 1e308})],  # finite, but past float32's range
    "ablationcam": [("value=1e308", {"value": 1e308})],
}

REDUCES = (None, *salience.reduce.REDUCTIONS)
ENGINE_OPTIONS = frozenset(_ENGINE)

FULL = frozenset({"cnn", "grayscale", "train_mode"})
"""The kinds that get every option cell. The others (trimmed to keep the matrix under 40 s on one core) get the
targets, ``layer=``, ``reduce=None`` (the raw ``(B, C, H, W)`` gradient) and the method's own options, but neither
the other ``reduce=`` values (applied to the gradient after the model's pass: the same code on every kind) nor the
engine's options (``chunk``, ``max_memory``, ``progress``, ``memory_format``, ``precision``), except where the
kind's layout is what they change: ``memory_format`` on Swin (channels-last stages) and the exported program."""

_KIND_ENGINE = {"timm_swin": {"memory_format"}, "exported": {"memory_format", "chunk"}}

# resnet18 (11.7 M parameters: a pass costs 10 x SmallCNN's at these sizes) runs the default cell, the targets,
# reduce=None and the named layer only (the methods' own options run on the 13 other kinds); in Score-CAM and
# Ablation-CAM, whose default layer (layer4, 512 channels) costs one masked pass per channel, not target=1 either
_FEW = {"resnet18": ("default", "target=1", "target=[1,0]", "reduce=None", "layer=named")}
_FEWER = {("resnet18", "scorecam"), ("resnet18", "ablationcam")}


def _label(k: str, v: Any) -> str:
    return f"{k}={v.__name__}" if callable(v) else f"{k}={v!r}"


def cells(kind: str, method: str) -> list[tuple[str, dict[str, Any]]]:
    """The option cells of ``method`` on ``kind``: (label, keyword arguments), the cheap options always given."""
    params = _params(method)
    base = dict(CHEAP.get(method, {}))
    if method == "occlusion":
        base["window"] = KINDS[kind][2] // 2
    out = [("default", base), ("target=1", {**base, "target": 1}), ("target=[1,0]", {**base, "target": [1, 0]})]
    if "reduce" in params:
        reduces = [r for r in REDUCES if r != params["reduce"]] if kind in FULL else [None]
        out += [(f"reduce={r}", {**base, "reduce": r}) for r in reduces]
    if "layer" in params:
        out.append(("layer=named", {**base, "layer": KINDS[kind][3]}))
    engine = ENGINE_OPTIONS if kind in FULL else _KIND_ENGINE.get(kind, set())
    out += [(_label(k, v), {**base, k: v}) for k, v in OPTIONS[method].items()
            if k not in ENGINE_OPTIONS or k in engine]
    out += [(label, {**base, **kw}) for label, kw in COMBINED.get(method, [])]
    if method == "layercam":  # a fusion of layers, with gamma past float32's range and infinite
        fused = {**base, "layer": [KINDS[kind][3]] * 2}
        out += [("layer=[named,named]", fused), ("layer=[named,named],gamma=1e308", {**fused, "gamma": 1e308}),
                ("layer=[named,named],gamma=inf", {**fused, "gamma": math.inf})]
    if kind in _FEW:
        keep = [k for k in _FEW[kind] if (kind, method) not in _FEWER or k != "target=1"]
        return [(label, kw) for label, kw in out if label in keep]
    return out


def _params(method: str) -> dict[str, Any]:
    """The keyword defaults of ``method`` (Eigen-CAM's registry entry wraps the function)."""
    real = salience.eigencam if method == "eigencam" else salience.METHODS[method]
    return {n: p.default for n, p in inspect.signature(real).parameters.items()}


# ------------------------------------------------------------------------------------------------ expected refusals

_CNNS = {"cnn", "resnet18", "exported", "tuple", "dict", "regression", "train_mode", "frozen", "grayscale"}
_SCRIPTS = {"scripted", "traced"}
_GELU = {"tv_vit", "hf_vit", "timm_swin"}
_ATTENTION = {"attention_rollout", "transformer_attribution"}
_GUIDED = {"guided_backprop", "deconvnet", "guided_gradcam"}
_CAMS = set(salience.methods.LAYER_METHODS)
_ALL = set(salience.METHODS)

# (kinds, methods, label pattern, a part of the message, why): the first rule that matches a cell says it refuses
REFUSED: list[tuple[set[str], set[str], str, str, str]] = [
    ({"regression"}, _ALL, r"target=(1|\[1,0\])$", "out of range for a model with 1 output (valid",
     "a one-output model has no class 1"),
    (set(KINDS), {"layercam"}, "gamma=inf", "gamma must be a positive finite number",
     "an infinite slope (was a map of NaN where a layer's map is 0); checked before the model is looked at"),
    (set(KINDS), {"layercam"}, "^gamma=", "only where several layers are fused",
     "gamma beside one layer (was ignored: the map the same whatever its value); checked before the model"),
    (set(KINDS), {"integrated_gradients", "occlusion", "ablationcam"}, "=1e308", "does not fit the images' dtype",
     "a number float32 cannot hold (was a raw RuntimeError where it was filled in)"),
    (_SCRIPTS, set(salience.methods.HOOKED_METHODS), ".*", "TorchScript",
     "hooks, backprop rules and attention capture do not reach a compiled graph"),
    (_SCRIPTS, {"smoothgrad"}, "method=guided_backprop", "TorchScript", "SmoothGrad of guided backprop: as above"),
    (_CNNS, _ATTENTION, ".*", "saw no attention operation", "no attention in a CNN"),
    ({"timm_swin"}, _ATTENTION, ".*", "needs global self-attention", "windowed attention"),
    (_GELU, _GUIDED, r"^(?!unsupported=)", "defined for ReLU-type activations only",
     "the backprop rules are not defined for GELU (unsupported='ignore' takes it)"),
    (_GELU, {"smoothgrad"}, "method=guided_backprop", "defined for ReLU-type activations only", "as above"),
    (set(KINDS), {"integrated_gradients"}, "^blur_sigma=", "applies to it only",
     "blur_sigma beside a baseline other than 'blur' (was ignored: the map the same whatever its value)"),
    (set(KINDS), {"integrated_gradients"}, r"blur_sigma=('2'|inf)", "blur_sigma must be a finite number",
     "not a number (was a raw TypeError), infinite (was a raw OverflowError)"),
    (_CNNS | {"timm_swin"}, _CAMS, "prefix_tokens=1", "applies to token outputs",
     "prefix tokens on a 4-D layer output"),
    (_CNNS, _CAMS, r"grid=\(4, 4\)", "matches neither (h, w)", "a grid that is not the layer's"),
]


def expected_refusal(kind: str, method: str, label: str) -> Optional[str]:
    """The part of the message the cell must refuse with, or ``None`` where it must give a map."""
    for kinds, methods, pattern, says, _why in REFUSED:
        if kind in kinds and method in methods and re.search(pattern, label):
            return says
    return None


# ------------------------------------------------------------------------------------------------ running a cell


def expected_shape(method: str, kw: dict[str, Any], x: torch.Tensor) -> Optional[tuple[int, ...]]:
    """The documented shape of the map; ``None``: a map ``(B, h, w)`` of the layer's grid (``upsample=False``)."""
    b, c, h, w = x.shape
    if kw.get("upsample") is False:
        return None
    params = _params(method)
    reduce = kw.get("reduce", params.get("reduce", "max_abs"))
    if "reduce" in params and reduce in (None, "colored", "abs"):
        return (b, c, h, w)
    return (b, h, w)


def _check_map(m: Any, method: str, kw: dict[str, Any], x: torch.Tensor) -> Optional[str]:
    """What is wrong with the map ``m`` (``None``: a finite tensor of the documented shape)."""
    if kw.get("return_gap"):
        m = m.attributions
    if not isinstance(m, torch.Tensor):
        return f"returned {type(m).__name__}"
    if not torch.isfinite(m).all():
        return f"a map with non-finite values, shape {tuple(m.shape)}"
    want = expected_shape(method, kw, x)
    if want is None and (m.dim() != 3 or m.shape[0] != x.shape[0]):
        return f"shape {tuple(m.shape)}, expected (B, h, w)"
    if want is not None and tuple(m.shape) != want:
        return f"shape {tuple(m.shape)}, expected {want}"
    return None


def run_cell(model: nn.Module, method: str, kw: dict[str, Any], x: torch.Tensor) -> tuple[str, str]:
    """("ok", "") or ("refused", the message) or ("BAD", what went wrong: a raw exception, a bad map)."""
    kw = dict(kw)
    target = kw.pop("target", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = salience.METHODS[method](model, x, target, **kw)
    except SalienceError as e:
        return "refused", str(e)
    except Exception as e:  # noqa: BLE001 - what the matrix looks for
        return "BAD", f"raw {type(e).__name__}: {str(e)[:300]}"
    wrong = _check_map(m, method, kw, x)
    return ("BAD", wrong) if wrong else ("ok", "")


def verdict(kind: str, method: str, label: str, status: str, message: str) -> Optional[str]:
    """What is wrong with a cell's outcome, against :data:`REFUSED` (``None``: as expected)."""
    says = expected_refusal(kind, method, label)
    if status == "BAD":
        return message
    if says is None and status == "refused":
        return f"refused: {message}"
    if says is not None and status == "ok":
        return f"gave a map; expected a refusal saying {says!r}"
    if says is not None and says not in message:
        return f"refused saying {message!r}; expected {says!r}"
    return None


# ------------------------------------------------------------------------------------------------ the matrix


ONE_SNAPSHOT = frozenset({"resnet18"})
"""The kinds whose model is checked once around all of a method's cells, not after each: a snapshot of resnet18's
11.7 M parameters costs 90 ms, 6.5 s over its cells; the other kinds' cost 0.7-5.7 ms, 5 s over all their 2,500
cells (session 56, on the 2-core machine under load)."""


@pytest.mark.parametrize("method", list(salience.METHODS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_matrix(built: Callable[[str], nn.Module], kind: str, method: str) -> None:
    """Every option cell of ``method`` on ``kind`` gives a finite map of the documented shape or the refusal
    :data:`REFUSED` lists, and the model is exactly as it was after each cell (a change stays; the first cell after
    which it changed is named; on the :data:`ONE_SNAPSHOT` kinds one snapshot around the cells, and a failure reruns
    them one by one on a fresh model to name it)."""
    model, x = built(kind), image(kind)
    if kind not in ONE_SNAPSHOT:
        wrong, changed = _cells_each_checked(model, kind, method, x)
        if changed:
            _BUILT.pop(kind)  # the changed model: dropped
        assert not wrong, "\n".join(wrong)
        return
    wrong = []
    try:
        with unchanged(model):
            wrong += _cells_run(model, kind, method, x)
    except AssertionError as e:
        _BUILT.pop(kind)  # the changed model: the cells rerun on a fresh one, which is then dropped too
        wrong.append(f"{kind} x {method}: {e} (first after the cell {_first_changing(built(kind), kind, method)})")
        _BUILT.pop(kind)
    assert not wrong, "\n".join(wrong)


def _cells_run(model: nn.Module, kind: str, method: str, x: torch.Tensor,
               only: Optional[list[tuple[str, dict[str, Any]]]] = None) -> list[str]:
    """What is wrong with each cell's outcome (``only``: those cells, default all of :func:`cells`)."""
    wrong = []
    for label, kw in only if only is not None else cells(kind, method):
        status, message = run_cell(model, method, kw, x)
        problem = verdict(kind, method, label, status, message)
        if problem:
            wrong.append(f"{kind} x {method} x {label}: {problem}")
    return wrong


def _cells_each_checked(model: nn.Module, kind: str, method: str, x: torch.Tensor) -> tuple[list[str], bool]:
    """:func:`_cells_run` with the model checked unchanged after each cell; stops at the first cell that changed
    it. Returns what is wrong and whether the model changed."""
    wrong: list[str] = []
    for label, kw in cells(kind, method):
        try:
            with unchanged(model):
                wrong += _cells_run(model, kind, method, x, [(label, kw)])
        except AssertionError as e:
            wrong.append(f"{kind} x {method}: {e} (first after the cell {label})")
            return wrong, True
    return wrong, False


def _first_changing(model: nn.Module, kind: str, method: str) -> str:
    """The label of the first cell after which ``model`` (a fresh one) is not as it was."""
    x = image(kind)
    for label, kw in cells(kind, method):
        try:
            with unchanged(model):
                run_cell(model, method, kw, x)
        except AssertionError:
            return label
    return "(none alone)"


def test_every_refusal_rule_is_used() -> None:
    """Each rule of :data:`REFUSED` matches some cell, so a rule left over from a fixed refusal shows."""
    used = {i for kind in KINDS for method in salience.METHODS for label, _ in cells(kind, method)
            for i, (kinds, methods, pattern, _, _) in enumerate(REFUSED)
            if kind in kinds and method in methods and re.search(pattern, label)}
    assert used == set(range(len(REFUSED)))


# ------------------------------------------------------------------------------------------------ the checks can fail


def _hooking(model: nn.Module, x: torch.Tensor, target: Any = None, **kw: Any) -> torch.Tensor:
    """A method that leaves a forward hook on the model and then refuses: a model not put back."""
    model.register_forward_hook(lambda *a: None)
    raise SalienceError("refused after hooking")


@pytest.mark.parametrize("fake, says", [
    (lambda model, x, target=None, **kw: 1 / 0, "raw ZeroDivisionError"),
    (lambda model, x, target=None, **kw: torch.full(x[:, 0].shape, float("nan")), "non-finite"),
    (lambda model, x, target=None, **kw: x[:, 0, :4], "shape (2, 4, 16), expected (2, 16, 16)"),
    (lambda model, x, target=None, **kw: x.sum(), "shape (), expected (2, 16, 16)"),
])
def test_a_bad_cell_is_reported(monkeypatch: pytest.MonkeyPatch, fake: Callable, says: str) -> None:
    """A raw exception, a NaN map or a map of the wrong shape is a failing cell, not a pass."""
    monkeypatch.setitem(salience.METHODS, "vanilla", fake)
    model = _cnn()
    status, message = run_cell(model, "vanilla", {}, image("cnn"))
    assert status == "BAD" and says in message
    assert verdict("cnn", "vanilla", "default", status, message) == message


def test_a_changed_model_is_reported_with_its_cell(monkeypatch: pytest.MonkeyPatch,
                                                   built: Callable[[str], nn.Module]) -> None:
    """A method that leaves a hook fails the matrix cell, naming the first cell after which the model changed (checked
    after each cell, or once around them on resnet18);
    a refusal not in :data:`REFUSED` and a listed refusal that no longer comes fail too."""
    monkeypatch.setitem(salience.METHODS, "vanilla", _hooking)
    with pytest.raises(AssertionError, match=r"(?s)frozen x vanilla: model hooks changed.*first after the cell default"):
        test_matrix(built, "frozen", "vanilla")
    with pytest.raises(AssertionError, match=r"(?s)resnet18 x vanilla: model hooks changed.*first after the cell default"):
        test_matrix(built, "resnet18", "vanilla")  # one snapshot around the cells, then the cells one by one
    assert verdict("cnn", "vanilla", "default", "refused", "no") == "refused: no"
    assert "expected a refusal" in verdict("scripted", "gradcam", "default", "ok", "")
    assert "expected 'TorchScript'" in verdict("scripted", "gradcam", "default", "refused", "other words")
