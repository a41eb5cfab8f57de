"""Where salience's warnings point: at the user's line that called salience (``warnings.warn``'s
``stacklevel``), as Python's warnings should, so that the message names the caller's file and line
and the warning filters (``module=``, ``"once"`` per location) act on it. Fixed levels pointed
inside salience (``_core/perf.py``, ``contextlib``, ``runs/dataset.py``) whenever the warning came by
a path of another depth: a single pass (through ``perf.one_pass``'s ``with`` block) against a
many-pass method's run, a method called by SmoothGrad, a dataset run. Each test calls the public
function from here and checks the warning's file is this one (``_core.errors.user_stacklevel``)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import compiled as _compiled_mod
from salience._core import perf as _perf
from salience.methods.integrated import CompletenessWarning

from conftest import SmallCNN, counting_backend

HERE = __file__


def _caught(category, fn, *args, **kwargs):
    """The warnings of ``category`` that ``fn(*args, **kwargs)`` gives (all of them, none filtered)."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    found = [w for w in got if issubclass(w.category, category)]
    assert found, [str(w.message) for w in got]
    return found


def _places(found):
    return {(w.filename, str(w.message)[:40]) for w in found if w.filename != HERE}


class _Probabilities(nn.Module):
    """A model whose output is probabilities made without a softmax call (salience cannot strip it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        z = self.conv(x).mean((2, 3)).exp()
        return z / z.sum(1, keepdim=True)


class _Steep(nn.Module):
    """Two outputs far from linear in the input: the trapezoid rule on the path's two ends gives
    ``7/2`` of ``sum(x^7)``, a relative gap of 250 % (over ``GAP_WARNING``)."""

    def forward(self, x):
        s = x.flatten(1)
        return torch.stack([(s ** 7).sum(1), (s ** 2).sum(1)], 1)


@pytest.fixture
def x():
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_a_third_recurring_batch_size_warns_at_the_callers_line():
    """``perf.ONE_PASS_SIZES``: vanilla under ``compile=`` on batches of 1, 1, 2, 2, 3, 3 compiles 1
    and 2; the third recurring size (3) warns once. It pointed at ``contextlib`` (stacklevel 4 from
    ``perf._compiles``, under ``one_pass``'s ``with``); now at the call below."""
    torch._dynamo.reset()  # SmallCNN.forward's code object: earlier tests' graphs count to its recompile limit
    _perf.clear_cache()
    model = SmallCNN().eval()
    backend, graphs, _ = counting_backend()
    xs = [torch.rand(n, 3, 8, 8) for n in (1, 1, 2, 2, 3, 3)]

    def calls():
        with salience.performance(compile=backend):
            for xb in xs:
                salience.vanilla(model, xb)
    found = [w for w in _caught(UserWarning, calls) if "recurs" in str(w.message)]
    assert len(found) == 1 and len(graphs) == 2
    assert found[0].filename == HERE, found[0].filename
    _perf.clear_cache()


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad"])
def test_fold_batchnorm_without_a_pair_to_fold_warns_at_the_callers_line(x, method):
    """``fold_batchnorm=True`` on a model without a BatchNorm after a convolution: a single pass (vanilla)
    and a many-pass run (SmoothGrad) warn from the same line (``perf.Run``) at two depths."""
    _perf.clear_cache()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).eval()
    model(x)
    kw = dict(samples=2) if method == "smoothgrad" else {}

    def call():
        with salience.performance(fold_batchnorm=True):
            getattr(salience, method)(model, x, **kw)
    found = [w for w in _caught(UserWarning, call) if "fold_batchnorm" in str(w.message)]
    assert not _places(found), _places(found)
    _perf.clear_cache()


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad"])
def test_compile_on_a_model_with_hooks_of_its_own_warns_at_the_callers_line(x, method):
    """``compile=`` on a model with a forward hook of the user's runs eagerly, with a warning."""
    _perf.clear_cache()
    model = SmallCNN().eval()
    handle = model.head.register_forward_hook(lambda *a: None)
    backend, graphs, _ = counting_backend()
    kw = dict(samples=2) if method == "smoothgrad" else {}

    def call():
        with salience.performance(compile=backend):
            getattr(salience, method)(model, x, **kw)
    try:
        found = [w for w in _caught(UserWarning, call) if "compile" in str(w.message)]
    finally:
        handle.remove()
    assert not _places(found), _places(found)
    assert graphs == []
    _perf.clear_cache()


def test_a_failing_compile_backend_warns_at_the_callers_line(x):
    """A backend that raises: the pass runs eagerly, with a warning (``compiled._compile_failed``)."""
    torch._dynamo.reset()
    _perf.clear_cache()
    model = SmallCNN().eval()

    def broken(gm, inputs):
        raise RuntimeError("this backend always fails")

    def calls():
        with salience.performance(compile=broken):
            for _ in range(3):  # a size runs compiled from its second input (another tensor) on
                salience.vanilla(model, x.clone())
    found = [w for w in _caught(UserWarning, calls) if "compile" in str(w.message)]
    assert not _places(found), _places(found)
    _perf.clear_cache()


@pytest.mark.parametrize("method", ["rise", "occlusion"])
def test_a_failing_frozen_compile_warns_at_the_callers_line(x, method, monkeypatch):
    """``compile="freeze"`` whose frozen compile raises: those passes run unfrozen, with a warning
    (``perf.Run.forward_failed``) at the caller's line, from inside the engine's chunk loop."""
    torch._dynamo.reset()
    _perf.clear_cache()

    def broken(gm, inputs):
        raise RuntimeError("no frozen kernels")

    monkeypatch.setattr(_compiled_mod, "_freeze_compile", broken)
    model = SmallCNN().eval()
    kw = dict(masks=8, cell=2) if method == "rise" else dict(window=4, stride=4)
    found = [w for w in _caught(UserWarning, getattr(salience, method), model, x, 0, chunk=2, compile="freeze", **kw)
             if "freez" in str(w.message)]
    assert not _places(found), _places(found)
    _perf.clear_cache()
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad", "integrated_gradients"])
def test_probabilities_without_a_softmax_call_warn_at_the_callers_line(x, method):
    """The output looks like probabilities but no softmax was seen (``autograd.backward``): vanilla,
    SmoothGrad's inner vanilla, Integrated Gradients' path points reach it at three depths."""
    kw = dict(samples=2) if method == "smoothgrad" else dict(steps=2) if method == "integrated_gradients" else {}
    found = [w for w in _caught(UserWarning, getattr(salience, method), _Probabilities().eval(), x, **kw)
             if "probabilities" in str(w.message)]
    assert not _places(found), _places(found)


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_the_completeness_warning_points_at_the_callers_line(x, method):
    """Integrated Gradients' gap (``CompletenessWarning``), alone and as SmoothGrad's inner method."""
    model = _Steep()
    if method == "smoothgrad":
        found = _caught(CompletenessWarning, salience.smoothgrad, model, x, 0, samples=2,
                        method=salience.integrated_gradients, steps=2)
    else:
        found = _caught(CompletenessWarning, salience.integrated_gradients, model, x, 0, steps=2)
    assert not _places(found), _places(found)


def test_a_guided_rule_on_other_activations_warns_at_the_callers_line(x):
    """Guided backprop through a GELU with ``unsupported="warn"`` (it pointed here already)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(3)).eval()
    model(x)
    found = _caught(UserWarning, salience.guided_backprop, model, x, unsupported="warn")
    assert not _places(found), _places(found)


def _images(folder, n):
    import numpy as np
    from PIL import Image

    imgs, _, _ = salience.data.shapes(n, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(paths[-1])
    return paths


def test_a_labels_csv_naming_some_images_warns_at_the_callers_line(tmp_path):
    """``explain_dataset(labels=CSV)`` with images the CSV does not name: it pointed at
    ``runs/dataset.py`` (stacklevel 2 from ``sources``)."""
    paths = _images(tmp_path / "imgs", 2)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n001.png,2\n")
    found = [w for w in _caught(UserWarning, salience.explain_dataset, "demo:shapes", paths, ["vanilla"],
                                tmp_path / "run", labels=csv, workers=0) if "labels" in str(w.message)]
    assert found and not _places(found), _places(found)


def test_a_dataset_runs_completeness_warning_points_at_the_callers_line(tmp_path):
    """A dataset run's one ``CompletenessWarning`` (``runs.job``): it pointed at ``runs/job.py``. A run
    without a batch size also gave a second one, from the one-image probe that chooses the size
    (``job.choose_batch``, outside the run's ``collect_gaps``: "of image 0", at ``runs/dataset.py``);
    the probe now drops its reports, and the run names its images once."""
    from conftest import RandomImages

    found = _caught(CompletenessWarning, salience.explain_dataset, _Steep(), RandomImages(2),
                    ["integrated_gradients"], tmp_path / "run", workers=0, target=0,
                    method_options={"integrated_gradients": {"steps": 2}})
    assert not _places(found), _places(found)
    assert len(found) == 1 and "RandomImages[0]" in str(found[0].message), [str(w.message) for w in found]


def test_a_run_folder_that_cannot_be_locked_warns_at_the_callers_line(tmp_path, monkeypatch):
    """A file system without locks (``OSError`` from the lock): the run goes on, with a warning; it
    pointed at ``contextlib`` (stacklevel 5 from ``runs.lock``)."""
    from conftest import RandomImages
    from salience.runs import lock

    def no_locks(fd, shared=False, start=0):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(lock, "_try_lock", no_locks)
    found = [w for w in _caught(UserWarning, salience.explain_dataset, SmallCNN().eval(), RandomImages(2),
                                ["vanilla"], tmp_path / "run", workers=0) if "lock" in str(w.message)]
    assert found and not _places(found), _places(found)


def test_every_warning_of_salience_points_past_salience():
    """Every ``warnings.warn`` in salience's source takes ``stacklevel=user_stacklevel()`` (a fixed level
    is right for one path only); the tests above check the paths users take."""
    import pathlib
    import re

    root = pathlib.Path(salience.__file__).parent
    calls = [(str(p.relative_to(root)), m.group(0)) for p in root.rglob("*.py")
             for m in re.finditer(r"warnings\.warn\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)", p.read_text())]
    assert len(calls) >= 10
    assert [c for c in calls if "stacklevel=user_stacklevel()" not in c[1]] == []
