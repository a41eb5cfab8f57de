"""The Python API of the metrics (``salience.evidence``) and of dataset runs (``salience.runs``) over
the inputs a user passes: each call works, or raises a ``SalienceError`` saying what to do, and the
user's model comes back as it was. Each test here failed before its fix (a raw ``TypeError`` /
``RuntimeError``, a bad option taken as each row's error, a NaN result, or an option silently
ignored)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import salience
from salience import SalienceError
from salience._core.info import ModelInfo, attach_info
from salience.evidence import evaluate as ev

from conftest import SmallCNN, unchanged


def _cnn(c: int = 3, classes: int = 4) -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(c, classes)  # train mode, as a user's model may be


X = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
MASKS = torch.zeros(3, 8, 8, dtype=torch.bool)
MASKS[:, 2:5, 2:5] = True


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((8, 8, 3)) * 255).astype("uint8")).save(d / f"i{i}.png")
    return d


# ----------------------------------------------------------------------------- evaluate_methods

@pytest.mark.parametrize("x, masks, options, message", [
    (X[0], MASKS, {}, r"shape \(B, C, H, W\).*unsqueeze\(0\)"),
    ((X * 255).to(torch.uint8), MASKS, {}, r"floating-point x.*x.float\(\) / 255"),
    (X.numpy(), MASKS, {}, r"x as a torch.Tensor"),
    (X, MASKS[:, :-1], {}, r"masks of shape \(3, 7, 8\) do not match"),
    (X, MASKS[:2], {}, r"masks of shape \(2, 8, 8\) do not match"),
    (X, MASKS.float() * 0.5, {}, r"threshold them first"),
    (X, MASKS, {"steps": 0}, r"steps must be an int >= 1 \(a pass of the model each.*\), got 0"),
    (X, MASKS, {"randomization_images": 0}, r"randomization_images must be an int >= 1, got 0"),
    (X, MASKS, {"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
    (X, MASKS, {"seed": 0.5}, r"seed must be an int, got 0.5"),
    (X, MASKS, {"baselines": "no"}, r"baselines must be True or False, got 'no'"),
    (X, MASKS, {"progress": "no"}, r"progress must be True or False, got 'no'"),
], ids=["chw", "uint8", "numpy", "mask-shape", "mask-batch", "mask-fractions", "steps0", "randomization0",
        "batch0", "seed-float", "baselines-str", "progress-str"])
def test_evaluate_methods_refuses_its_arguments_before_any_work(x, masks, options, message):
    """A bad argument of the call is one SalienceError before any map is made: it was each row's
    ``error`` after every method's maps and metrics (or a raw TypeError / RuntimeError of the model for
    an x that is not a float batch; ``batch_size=0`` a row's raw ValueError; ``baselines="no"`` taken
    as true)."""
    model = _cnn()
    calls = []
    method = lambda m, xx, t, **k: calls.append(1) or salience.vanilla(m, xx, t)  # noqa: E731
    with unchanged(model), pytest.raises(SalienceError, match=message):
        ev.evaluate_methods(model, x, masks, methods=[method], **{"steps": 2, "randomization_images": 1, **options})
    assert not calls


def test_run_evaluation_refuses_its_options_before_the_folder(tmp_path):
    model = attach_info(_cnn(), ModelInfo(name="cnn", input_size=(8, 8)))
    for options, message in [({"steps": 0}, "steps must be"), ({"randomization_images": 0}, "randomization_images"),
                             ({"progress": "no"}, "progress must be True or False"), ({"seed": 1.5}, "seed must be")]:
        with unchanged(model), pytest.raises(SalienceError, match=message):
            ev.run_evaluation(model, tmp_path / "out", methods=["vanilla"], n=2, **options)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- explain_dataset

def test_a_torchscript_model_runs_a_dataset(folder, tmp_path):
    """A TorchScript model (which every method explains) stopped a dataset run with torch's raw
    "register_forward_hook is not supported on ScriptModules": the run read the prediction from the
    first method's pass with a hook. Its maps equal the method's on the same images."""
    torch.manual_seed(0)
    plain = SmallCNN().eval()
    scripted = attach_info(torch.jit.script(plain), ModelInfo(name="scripted", input_size=(8, 8)))
    with unchanged(scripted):
        run = salience.explain_dataset(scripted, folder, ["vanilla"], tmp_path / "run", workers=0, metrics=True,
                                       metric_steps=2)
    rows = run.table.to_pylist()
    assert [r["error"] for r in rows] == [None] * 3
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"i{i}.png"), np.float32) / 255).permute(2, 0, 1)
                     for i in range(3)])
    with torch.no_grad():
        assert [r["predicted"] for r in rows] == plain(x).argmax(1).tolist()
    want = salience.vanilla(plain, x).numpy()
    np.testing.assert_allclose(np.stack([run.map(i, "vanilla") for i in range(3)]), want, rtol=2 ** -10, atol=6e-8)


@pytest.mark.parametrize("images, message", [
    (torch.rand(2, 3, 8, 8), r"images is a Tensor of shape \(2, 3, 8, 8\).*TensorDataset\(images\)"),
    (np.zeros((2, 3, 8, 8), np.float32), r"images is a ndarray of shape \(2, 3, 8, 8\).*TensorDataset"),
    (5, r"images must be a folder, a glob, .*got int"),
    ([torch.rand(3, 8, 8)], r"images must be a folder, a glob, .*got list"),
], ids=["tensor", "ndarray", "int", "list-of-tensors"])
def test_explain_dataset_says_what_images_it_takes(images, message, tmp_path):
    """A tensor of images (what a user has at hand) was torch's raw "expected str, bytes or
    os.PathLike object, not Tensor"; an int "'int' object is not iterable"."""
    model = attach_info(_cnn(), ModelInfo(name="cnn", input_size=(8, 8)))
    with unchanged(model), pytest.raises(SalienceError, match=message):
        salience.explain_dataset(model, images, ["vanilla"], tmp_path / "run")


def test_a_model_of_any_size_on_files_says_what_to_do_from_python(folder, tmp_path):
    """The refusal named only the command line's ``--size H,W``, which a Python caller cannot give."""
    with pytest.raises(SalienceError, match=r"size=\(H, W\) \(model.salience_info = .*torch.utils.data.Dataset"):
        salience.explain_dataset(_cnn(), folder, ["vanilla"], tmp_path / "run")


@pytest.mark.parametrize("option", ["png", "overwrite", "show_progress"])
def test_explain_dataset_flags_take_only_bools(option, folder, tmp_path):
    """``png="no"`` wrote the PNGs, ``overwrite="no"`` overwrote a run: a string is truthy."""
    model = attach_info(_cnn(), ModelInfo(name="cnn", input_size=(8, 8)))
    with pytest.raises(SalienceError, match=rf"{option} must be True or False, got 'no'"):
        salience.explain_dataset(model, folder, ["vanilla"], tmp_path / "run", **{option: "no"})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode, message", [("decrease", "mode 'decrease' is for a regression model.*leave mode out"),
                                           ("maintain", "mode 'maintain' is for a regression model"),
                                           ("up", "mode must be one of increase, decrease, maintain, got 'up'")])
def test_a_classifier_refuses_a_regression_mode(mode, message, folder, tmp_path):
    """``mode`` is what a regression output's map shows; a classifier ignored it (``"decrease"`` gave the
    maps of the class's increase, ``"up"`` was taken), silently."""
    model = attach_info(_cnn(), ModelInfo(name="cnn", input_size=(8, 8)))
    with pytest.raises(SalienceError, match=message):
        salience.explain_dataset(model, folder, ["vanilla"], tmp_path / "run", mode=mode)


def test_a_string_of_methods_and_a_method_twice(tmp_path):
    """``methods="vanilla"`` was read letter by letter ("unknown method 'v'"); a method given twice made two
    rows of one name, and the maps of one of them were lost."""
    model = _cnn()
    rows, maps = ev.evaluate_methods(model, X, None, methods="vanilla, input_x_gradient", baselines=False, steps=2,
                                     randomization_images=1)
    assert [r.name for r in rows] == ["vanilla", "input_x_gradient"] and [r.error for r in rows] == [None, None]
    with pytest.raises(SalienceError, match="method 'vanilla' is given twice"):
        ev.evaluate_methods(model, X, None, methods=["vanilla", "vanilla"], steps=2)


# ----------------------------------------------------------------------------- metrics of a method

@pytest.mark.parametrize("metric", ["max_sensitivity", "random_logit", "randomization"])
def test_method_kwargs_the_method_does_not_take(metric):
    """An option the method does not take was its raw ``TypeError: vanilla() got an unexpected keyword
    argument`` (after the model's first pass); a list a raw error too."""
    model = _cnn()
    fn = getattr(salience.evidence, metric)
    with unchanged(model):
        with pytest.raises(SalienceError, match=r"method 'vanilla' takes no option 'nope' \(it takes: reduce, "):
            fn(model, X[:2], "vanilla", method_kwargs={"nope": 1})
        with pytest.raises(SalienceError, match=r"options of method 'vanilla' must be a dict.*got list"):
            fn(model, X[:2], "vanilla", method_kwargs=[1])


def test_random_logit_batch_size_zero():
    with pytest.raises(SalienceError, match="batch_size must be an int >= 1, got 0"):
        salience.evidence.random_logit(_cnn(), X[:2], "vanilla", batch_size=0)


def test_randomization_layers_one_name_or_none():
    """``layers="head"`` was read letter by letter ("no layer named 'h'"); ``layers=[]`` torch's raw
    "stack expects a non-empty TensorList"."""
    model = _cnn()
    with unchanged(model):
        one = salience.evidence.randomization(model, X[:2], "vanilla", layers="head")
        listed = salience.evidence.randomization(model, X[:2], "vanilla", layers=["head"])
        with pytest.raises(SalienceError, match=r"layers is empty.*randomization_layers\(model, x\)"):
            salience.evidence.randomization(model, X[:2], "vanilla", layers=[])
    assert one.layers == listed.layers == ["head"]
    assert one.values == listed.values


@pytest.mark.parametrize("fn", ["road", "road_curves"])
def test_road_fractions_a_number(fn):
    """``fractions=0.5`` was a raw "'float' object is not iterable"."""
    with pytest.raises(SalienceError, match=r"fractions must be a sequence of fractions, e.g. \(0.5,\).*got 0.5"):
        getattr(salience.evidence, fn)(_cnn(), X[:2], torch.rand(2, 8, 8), fractions=0.5)


@pytest.mark.parametrize("size", [1.0, 0.999])
def test_faithfulness_correlation_of_sets_of_every_pixel(size):
    """Sets of every pixel have the same sum of the map, so the correlation is NaN for every map and
    every model: refused, where it returned NaN."""
    with pytest.raises(SalienceError, match=r"replaces all 64 pixels in every set.*smaller fraction"):
        salience.evidence.faithfulness_correlation(_cnn(), X[:2], torch.rand(2, 8, 8), subsets=4, subset_size=size)


# ----------------------------------------------------------------------------- maps, curves, baselines

MAPS = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(3))
NAN_MAPS = MAPS.clone().index_fill_(0, torch.tensor([1]), float("nan"))
IMAGES = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("call, message", [
    (lambda: salience.evidence.spearman(NAN_MAPS, MAPS), r"a contain NaN or infinite values \(image 1 of 2\)"),
    (lambda: salience.evidence.spearman(MAPS.numpy(), MAPS), r"expected a as a torch.Tensor.*got ndarray"),
    (lambda: salience.evidence.ssim(MAPS, MAPS, window=0), r"window must be an int >= 1"),
    (lambda: salience.evidence.ssim(MAPS, MAPS, sigma=0), r"sigma must be a finite number >= 1e-06"),
    (lambda: salience.evidence.ssim(MAPS, MAPS, data_range=0), r"data_range must be a finite number"),
    (lambda: salience.evidence.hog_similarity(MAPS, MAPS, bins=0), r"bins must be an int >= 1"),
    (lambda: salience.evidence.hog_similarity(MAPS, MAPS, cell=2.5), r"cell must be an int >= 1"),
    (lambda: salience.evidence.spectral_residual(IMAGES.clone().fill_(float("nan"))),
     r"images contain NaN or infinite values \(images 0, 1 of 2\)"),
    (lambda: salience.evidence.sobel_edges(IMAGES.clone().fill_(float("inf"))), r"images contain NaN or infinite"),
    (lambda: salience.evidence.random_maps((2, -1, 6)), r"each side of shape must be an int >= 0, got -1"),
    (lambda: salience.evidence.random_maps((2, 6.0, 6)), r"each side of shape must be an int >= 0, got 6.0"),
    (lambda: salience.evidence.random_maps(6), r"shape must be a sequence of sides"),
    (lambda: salience.evidence.random_maps((2, 6, 6), device="nope"), r"device 'nope': not a device torch knows"),
    (lambda: salience.evidence.image_seeds(IMAGES, stream=-1), r"stream must be an int >= 0"),
    (lambda: salience.evidence.image_seeds(IMAGES.numpy()), r"expected x as a torch.Tensor.*got ndarray"),
    (lambda: salience.evidence.auc(np.zeros((2, 3))), r"expected curves as a torch.Tensor"),
    (lambda: salience.evidence.auc([[0.0, 1.0]]), r"expected curves as a torch.Tensor"),
    (lambda: salience.evidence.auc(torch.tensor([[0.0, float("nan"), 1.0]])), r"curves contain NaN"),
    (lambda: salience.evidence.linear_imputation(IMAGES.clone().fill_(float("nan")), MAPS > 0.5),
     r"x contain NaN or infinite values"),
    (lambda: salience.evidence.box_iou([[0, 0, 2, 2]], [[0, 0, 2, 2]]), r"expected two \(B, 4\) tensors.*got list"),
], ids=["spearman-nan", "spearman-numpy", "ssim-window0", "ssim-sigma0", "ssim-range0", "hog-bins0",
        "hog-cell-float", "spectral-nan", "sobel-inf", "random-negative", "random-float",
        "random-int", "random-device", "seeds-stream", "seeds-numpy", "auc-numpy", "auc-list", "auc-nan",
        "imputation-nan", "iou-list"])
def test_map_functions_refuse_what_they_cannot_score(call, message):
    """Each was a raw error (``TypeError``, ``RuntimeError``, ``ZeroDivisionError``, ``OverflowError``,
    ``AttributeError``) or a silent NaN / finite number from NaN input (Spearman of a NaN map ranked
    the NaNs and returned a correlation)."""
    with pytest.raises(SalienceError, match=message):
        call()


def test_auc_of_huge_values_is_their_area():
    """The float32 sum of values near 1e38 overflowed to inf; the area (trapezoid, hand-computed) is 2e38."""
    got = salience.evidence.auc(torch.tensor([[1e38, 3e38, 1e38]], dtype=torch.float32))
    assert got.dtype == torch.float32 and float(got[0]) == pytest.approx(2e38, rel=1e-6)


@pytest.mark.parametrize("fn", ["pointing_game", "weak_localization"])
def test_localization_of_no_images_is_no_values(fn):
    """An empty batch (a filter that kept no image) was a raw "cannot reshape tensor of 0 elements"."""
    got = getattr(salience.evidence, fn)(MAPS[:0], MAPS[:0] > 0.5)
    assert got.shape == (0,)


# ----------------------------------------------------------------------------- more of explain_dataset

@pytest.mark.parametrize("options, message", [
    ({"labels": [0.5, 1, 2]}, r"label of image 0 must be an int, got 0.5"),
    ({"metrics": 1}, r"metrics must be True, False or metric names.*got 1"),
    ({"method_options": [("vanilla", {})]}, r"method_options must be a dict of method name: options.*got list"),
    ({"methods": salience.vanilla}, r"methods must be names or a dict of name: function.*got function"),
    ({"max_pixels": 0}, r"max_pixels must be an int >= 1"),
    ({"max_pixels": -5}, r"max_pixels must be an int >= 1"),
], ids=["label-half", "metrics-int", "options-list", "methods-function", "max-pixels-0", "max-pixels-negative"])
def test_explain_dataset_options_of_the_wrong_kind(options, message, folder, tmp_path):
    """A label 0.5 was class 0 (``int()``), silently; ``max_pixels=0`` made every image an error row; the
    others were raw ``TypeError`` / ``AttributeError``."""
    model = attach_info(_cnn(), ModelInfo(name="cnn", input_size=(8, 8)))
    with unchanged(model), pytest.raises(SalienceError, match=message):
        salience.explain_dataset(model, folder, **{"methods": ["vanilla"], **options}, out=tmp_path / "run")


def test_a_run_row_by_a_string_says_it_is_the_type(folder, tmp_path):
    """``run.row("0")`` said "image 0 is not in the run", of a run that has image 0."""
    model = attach_info(_cnn(), ModelInfo(name="cnn", input_size=(8, 8)))
    run = salience.explain_dataset(model, folder, ["vanilla"], tmp_path / "run", workers=0)
    assert run.row(0)["index"] == 0
    with pytest.raises(SalienceError, match=r"index must be an int.*got '0'"):
        run.row("0")


@pytest.mark.parametrize("args, message", [
    ((X, torch.arange(3), X[0]), r"expected x of shape \(B, C, H, W\)"),
    ((X.numpy(), torch.arange(3), X), r"expected x as a torch.Tensor"),
    ((X, [0, 1, 2], X), r"expected labels as a \(N,\) tensor of class indices.*got list"),
], ids=["x-chw", "images-numpy", "labels-list"])
def test_data_randomization_refuses_before_training(args, message):
    """A bad ``x`` was the model's raw error after both trainings (``train_fn`` called twice first)."""
    trained = []

    def train_fn(images, labels):
        trained.append(1)
        return _cnn().eval()
    with pytest.raises(SalienceError, match=message):
        salience.evidence.data_randomization(train_fn, args[0], args[1], args[2], "vanilla")
    assert not trained


# ----------------------------------------------------------------------------- valid inputs the checks must take

def _named_cnn() -> torch.nn.Module:
    return attach_info(_cnn(), ModelInfo(name="cnn", input_size=(8, 8)))


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]), [0.0, 1.0, 2.0],
                                    [np.array(0), np.array(1), np.array(2)], list(torch.tensor([[0], [1], [2]]))],
                         ids=["ndarray-float", "tensor-float", "list-float", "0d-arrays", "one-element-tensors"])
def test_labels_of_integral_floats_and_one_element_arrays(labels, folder, tmp_path):
    """``np.loadtxt``'s float64 labels, a float tensor of labels and the rows of an ``(N, 1)`` tensor were class
    indices before the check of 0.5 (``int()``), and are as a dataset's own labels (``sources._item_label``);
    the check refused them all ("must be an int, got 0.0")."""
    run = salience.explain_dataset(_named_cnn(), folder, ["vanilla"], tmp_path / "run", labels=labels, workers=0)
    assert run.table.column("label").to_pylist() == [0, 1, 2]


@pytest.mark.parametrize("methods", [{"vanilla": 0}.keys(), (m for m in ["vanilla"]), iter(["vanilla"])],
                         ids=["dict-keys", "generator", "iterator"])
def test_methods_as_any_iterable_of_names(methods, folder, tmp_path):
    """An iterable of names (``METHODS.keys()``, a generator) ran before the check of a function given as
    ``methods``, which refused anything but a list or a dict."""
    run = salience.explain_dataset(_named_cnn(), folder, methods, tmp_path / "run", workers=0)
    assert run.methods == ["vanilla"] and run.table.column("error").to_pylist() == [None] * 3


def test_a_function_in_a_list_of_methods_says_to_name_it(folder, tmp_path):
    with pytest.raises(SalienceError, match=r"a method given as a function needs a name: methods=\{'vanilla': fn\}"):
        salience.explain_dataset(_named_cnn(), folder, [salience.vanilla], tmp_path / "run")


@pytest.mark.parametrize("metrics, want", [(None, []), (np.bool_(False), []),
                                           (np.bool_(True), ["insertion", "deletion"])], ids=["none", "np-false",
                                                                                              "np-true"])
def test_metrics_none_and_numpy_bools(metrics, want, folder, tmp_path):
    """``metrics=None`` (no metrics) ran before the check of ``metrics``' kind, which refused it; numpy's bools
    are bools everywhere else (``check_flag``)."""
    run = salience.explain_dataset(_named_cnn(), folder, ["vanilla"], tmp_path / "run", metrics=metrics,
                                   metric_steps=2, workers=0)
    assert run.manifest["metrics"] == want


def test_images_as_an_array_of_paths(folder, tmp_path):
    """A numpy array of paths (a DataFrame's column ``.values``) was a list of paths; the refusal of a tensor of
    images took it for pixels ("images is a ndarray of shape (2,)")."""
    paths = np.array([str(folder / "i0.png"), str(folder / "i1.png")])
    run = salience.explain_dataset(_named_cnn(), paths, ["vanilla"], tmp_path / "run", workers=0)
    assert len(run) == 2 and run.table.column("error").to_pylist() == [None, None]


def test_numpy_ints_for_the_counts_of_a_run(folder, tmp_path):
    """``check_int`` takes numpy ints, but ``max_pixels`` / ``shard_size`` / ``metric_steps`` were kept as given
    and written to run.json: "Object of type int64 is not JSON serializable"."""
    run = salience.explain_dataset(_named_cnn(), folder, ["vanilla"], tmp_path / "run", workers=np.int64(0),
                                   max_pixels=np.int64(10 ** 6), shard_size=np.int64(2), metrics=True,
                                   metric_steps=np.int64(2), batch_size=np.int64(2))
    cmd = run.manifest["command"]
    assert (cmd["max_pixels"], cmd["shard_size"], cmd["metric_steps"]) == (10 ** 6, 2, 2)


def test_a_run_row_by_a_tensor_index(folder, tmp_path):
    """``run.row(scores.argmax())`` (a 0-d integer tensor) found the row before the check of the index's kind."""
    run = salience.explain_dataset(_named_cnn(), folder, ["vanilla"], tmp_path / "run", workers=0)
    assert run.row(torch.tensor(1))["index"] == 1 and run.row(np.array(2))["index"] == 2
    with pytest.raises(SalienceError, match=r"index must be an int"):
        run.row(torch.tensor(1.0))


@pytest.mark.parametrize("fn", ["center_maps", "sobel_edges", "spectral_residual"])
def test_baselines_of_no_images_are_no_maps(fn):
    """``center_maps`` and ``sobel_edges`` of an empty batch gave ``(0, H, W)`` maps (as the metrics give empty
    results, docs/evaluation.md); the NaN check of the images refused it ("images is an empty batch")."""
    got = getattr(salience.evidence, fn)(IMAGES[:0])
    assert got.shape == (0, 6, 6) and got.dtype == torch.float32


def test_spearman_of_no_maps_is_no_values():
    """A raw "cannot reshape tensor of 0 elements" (the other map functions give empty results)."""
    got = salience.evidence.spearman(MAPS[:0], MAPS[:0])
    assert got.shape == (0,)


def test_data_randomization_takes_float_labels_of_whole_numbers():
    """Float labels (0.0, 1.0, 2.0) went to ``train_fn`` and scored its accuracy before the check of the labels,
    which refused every float tensor; 0.5 is still no class."""
    got = []

    def train_fn(images, labels):
        got.append(labels)
        return _cnn().eval()
    labels = torch.tensor([0.0, 1.0, 2.0])
    out = salience.evidence.data_randomization(train_fn, X, labels, X[:2], "vanilla")
    assert got[0] is labels and set(out["values"]) == {"spearman_abs", "spearman", "ssim", "hog"}
    with pytest.raises(SalienceError, match=r"class indices \(whole numbers\)"):
        salience.evidence.data_randomization(train_fn, X, torch.tensor([0.5, 1.0, 2.0]), X[:2], "vanilla")


def test_evaluate_methods_given_one_function_says_to_list_it():
    """``methods=salience.vanilla`` was a raw "'function' object is not iterable"."""
    with pytest.raises(SalienceError, match=r"methods is one function; .*methods=\[vanilla\]"):
        ev.evaluate_methods(_cnn(), X, None, methods=salience.vanilla, steps=2)


def test_a_traced_model_in_memory_is_explained_and_runs_a_dataset(tmp_path):
    """``torch.jit.trace``'s module (not saved and loaded: a ``TopLevelTracedModule``, whose ``_modules`` are
    behind ``__getattr__``) stopped every method with a raw ``KeyError: '_modules'`` (the structure fingerprint
    read the instance dict). Its maps equal the Python module's, in a call and in a dataset run."""
    torch.manual_seed(0)
    plain = SmallCNN().eval()
    traced = torch.jit.trace(plain, X)
    np.testing.assert_array_equal(salience.vanilla(traced, X).numpy(), salience.vanilla(plain, X).numpy())
    model = attach_info(traced, ModelInfo(name="traced", input_size=(8, 8)))
    with unchanged(model):
        run = salience.explain_dataset(model, torch.utils.data.TensorDataset(X), ["vanilla"], tmp_path / "run",
                                       workers=0, metrics=True, metric_steps=2, map_dtype="float32")
    assert run.table.column("error").to_pylist() == [None] * 3
    with torch.no_grad():
        assert run.table.column("predicted").to_pylist() == plain(X).argmax(1).tolist()
    np.testing.assert_array_equal(np.stack([run.map(i, "vanilla") for i in range(3)]),
                                  salience.vanilla(plain, X).numpy())


def test_two_functions_of_one_name_are_refused():
    """Two partials (named "method") or two lambdas made one row, the first one's maps and metrics lost, silently
    (the rows are a dict by name)."""
    import functools

    two = [functools.partial(salience.smoothgrad, samples=2), functools.partial(salience.smoothgrad, samples=4)]
    with pytest.raises(SalienceError, match=r"two methods are named 'method'.*fn.__name__ = 'method_2'"):
        ev.evaluate_methods(_cnn(), X, None, methods=two, steps=2)
    with pytest.raises(SalienceError, match=r"two methods are named '<lambda>'"):
        ev.evaluate_methods(_cnn(), X, None, methods=[lambda m, x, t: salience.vanilla(m, x, t)] * 2, steps=2)
    with pytest.raises(SalienceError, match=r"method 'vanilla' is given twice"):
        ev.evaluate_methods(_cnn(), X, None, methods=["vanilla", salience.vanilla], steps=2)
