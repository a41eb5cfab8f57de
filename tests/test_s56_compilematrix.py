"""``compile=`` in the matrix (session 56): every model kind of ``tests/test_s55_matrix.py`` x the six methods that
take ``compile=`` (:data:`COMPILING`) x a cheap backend (``"aot_eager"``: dynamo's tracing and AOT autograd without
inductor's code generation; ``"eager"``: dynamo's tracing alone), and the real default (``compile=True``, inductor;
``"freeze"``) on a CNN, a ViT and a TorchScript model (:data:`INDUCTOR`).

Each cell gives the eager map within :data:`RTOL` of its largest value, having run its chunks compiled (each chunk of
a run says how it ran: ``Run.layouts``), or runs them eagerly where :data:`EAGER` says so with the warning it lists,
or refuses as the eager call does (the refusals of ``tests/test_s55_matrix.py``'s ``REFUSED``); and the model comes
back exactly as it was after each call (``conftest.unchanged``). ``chunk=2`` makes every chunk one of the fixed size,
which is what runs compiled (a call with one chunk runs it eagerly: its probe).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import perf as _perf
from salience.methods import _multi
from conftest import unchanged
from test_s55_matrix import KINDS, built, expected_refusal, image  # noqa: F401 (built: a fixture)

COMPILING = ("smoothgrad", "integrated_gradients", "scorecam", "ablationcam", "occlusion", "rise")
"""The methods that take ``compile=``."""

RTOL = 1e-5
"""A compiled map against the eager map, of the eager map's largest magnitude: aot_eager and eager run the same aten
operations (equal to the bit here), inductor fuses them (float rounding)."""

INDUCTOR_RTOL = 1e-4  # FREEZE_RTOL in tests/test_performance.py

CHEAP: dict[str, dict[str, Any]] = {"smoothgrad": {"samples": 4}, "integrated_gradients": {"steps": 4},
                                    "rise": {"masks": 8}, "scorecam": {}, "ablationcam": {}, "occlusion": {}}

# (kinds, methods, a part of the warning, why): where the passes run eagerly, and the warning that says so
EAGER: list[tuple[set[str], set[str], str, str]] = [
    (set(KINDS), {"ablationcam"}, "ablationcam: compile=",
     "a forward hook replaces the layer's output in each pass, which a compiled graph does not follow"),
    ({"scripted", "traced"}, set(COMPILING), "torch.compile does not take a TorchScript model; running eagerly",
     "TorchScript runs its own graph (Score-CAM and Ablation-CAM refuse it: hooks)"),
]

def methods_of(kind: str) -> tuple[str, ...]:
    """The methods of :data:`COMPILING` run on ``kind``: on resnet18 not Score-CAM and Ablation-CAM (a masked pass
    per channel of the layer: 4 s a call for its 64-channel ``layer1``; the other kinds run them)."""
    return tuple(m for m in COMPILING if kind != "resnet18" or m not in ("scorecam", "ablationcam"))


def options(kind: str, method: str) -> dict[str, Any]:
    """The cell's keywords: the cheap ones, chunks of 2 items, occlusion's window half the image."""
    kw = {**CHEAP[method], "chunk": 2}
    if method == "occlusion":
        kw["window"] = KINDS[kind][2] // 2
    return kw


def eager_warning(kind: str, method: str) -> Optional[str]:
    """The part of the warning ``method`` on ``kind`` runs eagerly with (``None``: its chunks run compiled)."""
    for kinds, methods, says, _why in EAGER:
        if kind in kinds and method in methods:
            return says
    return None


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """How each chunk of each run closed from now on ran (``Run.layouts``: ``"contiguous compiled"``...)."""
    seen: list[list[str]] = []
    close = _perf.Run.close

    def recording(run: _perf.Run) -> None:
        seen.append(list(run.layouts))
        close(run)

    monkeypatch.setattr(_perf.Run, "close", recording)
    return seen


def _call(model: nn.Module, method: str, x: torch.Tensor, kw: dict[str, Any]) -> Any:
    """The map, or the :class:`SalienceError` it refused with; the model checked unchanged after the call."""
    with unchanged(model):
        try:
            return salience.METHODS[method](model, x, None, **kw)
        except SalienceError as e:
            return e


def cell(model: nn.Module, kind: str, method: str, backend: Any, seen: list[list[str]],
         rtol: float = RTOL) -> Optional[str]:
    """What is wrong with ``method`` on ``kind`` under ``compile=backend`` (``None``: as :data:`EAGER` and
    ``REFUSED`` say), against the same call with ``compile=False``."""
    x, kw = image(kind), options(kind, method)
    eager = _call(model, method, x, {**kw, "compile": False})
    del seen[:]
    out = _call(model, method, x, {**kw, "compile": backend})
    says = expected_refusal(kind, method, "default")
    if isinstance(eager, SalienceError) or isinstance(out, SalienceError):
        if not (isinstance(eager, SalienceError) and isinstance(out, SalienceError)):
            return f"eager: {eager!s:.200}; compiled: {out!s:.200}"
        return None if says is not None and says in str(out) else f"refused: {out}"
    if says is not None:
        return f"gave a map; expected a refusal saying {says!r}"
    err = float((out - eager).abs().max() / eager.abs().max().clamp_min(1e-30))
    if not err <= rtol:
        return f"compiled map off the eager map by {err:.2e} of its largest value (tolerance {rtol})"
    compiled = any(" compiled" in chunk for run in seen for chunk in run)
    if compiled == (eager_warning(kind, method) is not None):
        return f"chunks ran {seen}; expected {'eagerly' if compiled else 'compiled'}"
    return None


def _matrix_row(built: Callable[[str], nn.Module], kind: str, backend: Any, methods: tuple[str, ...],
                monkeypatch: pytest.MonkeyPatch, rtol: float) -> None:
    """The cells of ``methods`` on ``kind`` under ``compile=backend``, and the warnings :data:`EAGER` lists."""
    monkeypatch.setattr(_multi, "_UNAPPLIED", set())  # the once-per-process warnings are said again here
    seen = _recording(monkeypatch)
    model = built(kind)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        wrong = [f"{kind} x {method} x compile={backend!r}: {problem}" for method in methods
                 if (problem := cell(model, kind, method, backend, seen, rtol))]
    messages = " | ".join(str(w.message) for w in said)
    for method in methods:
        says = eager_warning(kind, method) if expected_refusal(kind, method, "default") is None else None
        if says is not None and says not in messages:
            wrong.append(f"{kind} x {method} x compile={backend!r}: ran eagerly without the warning {says!r}")
    assert not wrong, "\n".join(wrong)


# resnet18 (11.7 M parameters) and the timm / Hugging Face transformers: dynamo's tracing of their graphs is most of
# the matrix's time, so they run the cheapest backend only ("eager": dynamo's tracing alone)
_CHEAPEST = {"resnet18", "timm_swin", "hf_vit"}


@pytest.mark.parametrize("kind, backend", [(k, b) for k in KINDS for b in ("aot_eager", "eager")
                                           if b == "eager" or k not in _CHEAPEST])
def test_compile_matrix(built: Callable[[str], nn.Module], kind: str, backend: str,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each method that takes ``compile=`` on ``kind`` under a cheap backend: the eager map (or refusal), its chunks
    compiled (or eager with :data:`EAGER`'s warning), the model as it was after each call."""
    _matrix_row(built, kind, backend, methods_of(kind), monkeypatch, RTOL)


# (kind, backend): the methods run. Inductor generates and builds C++ for each graph (10-30 s each on one core, cold):
# the CNN's frozen forward (RISE), the ViT's compiled forward without gradients, and TorchScript's
# fallback for every method (tests/test_s45_compile.py and tests/test_performance.py run inductor on more methods)
INDUCTOR: dict[tuple[str, Any], tuple[str, ...]] = {("cnn", "freeze"): ("rise",),
                                                    ("tv_vit", True): ("rise",),
                                                    ("scripted", True): COMPILING, ("scripted", "freeze"): COMPILING}


@pytest.mark.parametrize("kind, backend", list(INDUCTOR))
def test_compile_matrix_inductor(built: Callable[[str], nn.Module], kind: str, backend: Any,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile=True`` and ``"freeze"`` (inductor) on a CNN, a ViT and a TorchScript model: the eager map within
    :data:`INDUCTOR_RTOL`, its chunks compiled (or eager with :data:`EAGER`'s warning), the model as it was."""
    if _perf.compile_unavailable("inductor", torch.device("cpu")) is not None:
        pytest.skip("inductor cannot run here: " + _perf.compile_unavailable("inductor", torch.device("cpu")))
    _matrix_row(built, kind, backend, INDUCTOR[kind, backend], monkeypatch, INDUCTOR_RTOL)


# ------------------------------------------------------------------------------------------------ the checks can fail


def _fake(shift: float) -> Callable[..., torch.Tensor]:
    """A method whose map moves by ``shift`` under ``compile=`` (any but ``False``) and that runs no chunk."""
    def method(model: nn.Module, x: torch.Tensor, target: Any = None, *, compile: Any = None, **kw: Any) -> torch.Tensor:
        return x.sum(1) + (0.0 if compile is False else shift)
    return method


def test_a_compiled_map_off_the_eager_map_or_run_eagerly_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled map not the eager map fails its cell; so does the same map from chunks that did not run compiled
    (or, where :data:`EAGER` says eager, from compiled chunks), and an eager run without its warning."""
    model = KINDS["cnn"][0]()
    monkeypatch.setitem(salience.METHODS, "rise", _fake(1.0))
    assert "compiled map off the eager map" in cell(model, "cnn", "rise", "eager", [])
    monkeypatch.setitem(salience.METHODS, "rise", _fake(0.0))
    assert cell(model, "cnn", "rise", "eager", []) == "chunks ran []; expected compiled"
    seen = [["contiguous compiled"]]
    monkeypatch.setitem(salience.METHODS, "ablationcam", lambda *a, **k: seen.append(["contiguous compiled"])
                        or _fake(0.0)(*a, **k))
    assert "expected eagerly" in cell(model, "cnn", "ablationcam", "eager", seen)
    monkeypatch.setitem(salience.METHODS, "ablationcam", _fake(0.0))
    with pytest.raises(AssertionError, match="ablationcam x compile='eager': ran eagerly without the warning"):
        _matrix_row(lambda kind: model, "cnn", "eager", ("ablationcam",), monkeypatch, RTOL)
