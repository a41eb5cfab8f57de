"""Every method of ``salience.METHODS`` x every performance option set for the process (``set_performance``): the
option is applied, and seen to be, or a ``UserWarning`` at the user's line says it is not; none is ignored without a
word. What is seen, without salience's help:

* ``precision="bf16"`` (CPU autocast): the dtype of the first convolution's output, from a forward hook;
* ``memory_format="channels_last"``: the strides of the first convolution's input, from a forward pre-hook;
* ``compile``: a ``torch.compile`` backend of the test's own that counts the graphs it is given (each method called
  twice, on two inputs of one batch size: a single pass compiles a recurring size only);
* ``fold_batchnorm=True``: the calls of ``F.batch_norm`` (the folded copy has none) against the same calls without it;
* ``chunks="throughput"``: the batch sizes of the first convolution's passes against ``chunks="memory"``'s.

``salience.class_model`` (no entry of ``METHODS``: an image, not a map) is checked alike. ``chunks`` concerns the
engine's many-pass calls only: a one-pass method (the gradient methods, the CAMs, the attention methods; class
model's steps, each a pass of its batch) runs its batch as one pass whatever the option (``"memory"`` neither): that
it is not concerned is checked too (the same passes under both values). The CNN methods run on a tiny CNN with
BatchNorm at 16 px, the attention methods on tests/tiny_vit.py at 16 px. ``MATRIX`` is read from the table of
docs/performance.md ("Which methods, and how"), so the docs and the test cannot disagree: a row, column or cell the
reader does not know fails the test file at once; the second table's cells that begin with "yes" / "no" (layout,
compiled forward, autocast) agree with it.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core import perf
from salience.methods import METHODS, _multi
from conftest import unchanged
from tiny_vit import TinyViT

QUICK = {"smoothgrad": {"samples": 8}, "integrated_gradients": {"steps": 8}, "rise": {"masks": 24},
         "occlusion": {"window": 4, "stride": 4}}
ONE_PASS = {"vanilla", "input_x_gradient", "guided_backprop", "deconvnet", "gradcam", "guided_gradcam",
            "gradcam_plus_plus", "hirescam", "xgradcam", "layercam", "eigencam", "attention_rollout",
            "transformer_attribution", "class_model"}
NAMES = [*METHODS, "class_model"]
DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
SECTION = "## Which methods, and how"
CELLS = {"applied": "A", "warned": "W", "—": "-"}  # the table's words: A applied, W warned, - not concerned


def _tables(text: str) -> list[list[list[str]]]:
    """The markdown tables of :data:`SECTION` in ``text``: each a list of rows of cells, the header first (the
    ``|---|`` line left out)."""
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    tables: list[list[list[str]]] = [[]]
    for line in body.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                tables[-1].append(cells)
        elif tables[-1]:
            tables.append([])
    return [t for t in tables if t]


def _names(cell: str) -> list[str]:
    return re.findall(r"`([a-z_0-9]+)`", cell)


def _matrix(table: list[list[str]]) -> tuple[list[str], dict[str, str]]:
    """The options (the header's columns after "method") and each method's row, a letter of :data:`CELLS` per
    option; a method named twice, a cell of another word or a first cell of anything but method names fails."""
    header, *rows = table
    assert header[0] == "method", header
    options = [c.strip("`") for c in header[1:]]
    matrix: dict[str, str] = {}
    for row in rows:
        assert len(row) == len(header), row
        assert re.fullmatch(r"`[a-z_0-9]+`(, `[a-z_0-9]+`)*", row[0]), \
            f"row {row[0]!r}: its first cell must be method names in backquotes, comma-separated"
        unknown = [c for c in row[1:] if c not in CELLS]
        assert not unknown, f"cells {unknown} of {row[0]}: the table's words are {list(CELLS)}"
        for name in _names(row[0]):
            assert name not in matrix, f"{name} in two rows"
            matrix[name] = "".join(CELLS[c] for c in row[1:])
    return options, matrix


TABLES = _tables(DOC.read_text(encoding="utf-8"))
OPTIONS, MATRIX = _matrix(TABLES[0])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in ("attention_rollout", "transformer_attribution"):
        return TinyViT(size=(16, 16), patch=4, dim=16, heads=2, depth=2).eval()
    net = Net().eval()
    with torch.no_grad():
        for bn in (net.features[1], net.features[4]):  # statistics that folding must carry
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    return net


def _x(name: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 16, 16)


def _conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _call(name: str, model: nn.Module, x: torch.Tensor, **options) -> torch.Tensor:
    if name == "class_model":  # not a map of x (no entry of METHODS): an image of x's size made by gradient ascent
        return salience.class_model(model, 1, shape=tuple(x.shape[1:]), steps=3, **options)
    return METHODS[name](model, x, 1, **QUICK.get(name, {}), **options)


@pytest.fixture(autouse=True)
def fresh_state():
    """Each cell as in a fresh process: the once-per-process warnings, the engine's caches, dynamo's graphs."""
    _multi._UNAPPLIED.clear()
    perf.clear_cache()
    torch._dynamo.reset()
    yield
    _multi._UNAPPLIED.clear()
    perf.clear_cache()
    torch._dynamo.reset()


class _Graphs:
    """A ``torch.compile`` backend that counts the graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, gm, example_inputs):
        self.n += 1
        return gm.forward


def _with(option: dict, calls, model: nn.Module) -> tuple[list, list]:
    """``calls()`` under ``set_performance(**option)`` (put back after): its results and the warnings given; the
    model comes back exactly as it was."""
    prev = salience.set_performance(**option)
    try:
        with unchanged(model), warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            out = calls()
    finally:
        salience.set_performance(**vars(prev))
    return out, said


def _hooked(model: nn.Module, pre: bool, record, calls):
    conv = _conv(model)
    handle = conv.register_forward_pre_hook(record) if pre else conv.register_forward_hook(record)
    try:
        return calls()
    finally:
        handle.remove()


def _observe(name: str, option: str) -> tuple[bool, list]:
    """Whether ``option`` (set for the process) was seen applied in ``name``'s calls, and the warnings given."""
    m, x = _model(name), _x(name)
    if option == "precision":
        dtypes: list = []
        _, said = _hooked(m, False, lambda mod, i, o: dtypes.append(o.dtype),
                          lambda: _with({"precision": "bf16"}, lambda: _call(name, m, x), m))
        return torch.bfloat16 in dtypes, said
    if option == "memory_format":
        layouts: list = []
        _, said = _hooked(m, True, lambda mod, i: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last)),
                          lambda: _with({"memory_format": "channels_last"}, lambda: _call(name, m, x), m))
        return any(layouts), said
    if option == "compile":
        graphs = _Graphs()  # a many-pass call runs its chunks of one fixed size compiled: chunk=4 makes them
        fixed = {} if name in ONE_PASS else {"chunk": 4}
        _, said = _with({"compile": graphs}, lambda: [_call(name, m, x, **fixed), _call(name, m, x.clone(), **fixed)],
                        m)
        return graphs.n > 0, said
    if option == "fold_batchnorm":
        return _fold_observed(name, m, x)
    sizes = {}
    for chunks in ("memory", "throughput"):
        perf.clear_cache()
        seen: list = []
        _, said = _hooked(m, True, lambda mod, i: seen.append(i[0].shape[0]),
                          lambda: _with({"chunks": chunks}, lambda: _call(name, m, x), m))
        sizes[chunks] = seen
    if name in ONE_PASS:  # not concerned: one pass of the batch a call, whatever the option
        assert len(sizes["throughput"]) <= 3 and sizes["throughput"] == sizes["memory"], sizes
    return sizes["throughput"] != sizes["memory"], said


def _fold_observed(name: str, m: nn.Module, x: torch.Tensor) -> tuple[bool, list]:
    counts, said = [], []
    real = F.batch_norm

    def counting(*args, **kwargs):
        counts[-1] += 1
        return real(*args, **kwargs)

    F.batch_norm = counting
    try:
        for fold in (False, True):
            perf.clear_cache()  # the same passes (a CAM's default-layer search, a softmax check) in both
            counts.append(0)
            _, said = _with({"fold_batchnorm": fold}, lambda: [_call(name, m, x), _call(name, m, x.clone())], m)
    finally:
        F.batch_norm = real
    return counts[1] < counts[0], said


def test_the_matrix_covers_every_method():
    """The table of docs/performance.md ("Which methods, and how"), read as data: its five options (those
    :func:`_observe` sees), and every registered method and ``class_model`` in it, once."""
    assert OPTIONS == ["precision", "memory_format", "compile", "fold_batchnorm", "chunks"]
    assert len(MATRIX) == len(NAMES) == 20 and set(MATRIX) == set(NAMES)
    for name, row in MATRIX.items():
        assert len(row) == len(OPTIONS) and set(row) <= set("AW-"), name
        assert (row[4] == "-") == (name in ONE_PASS), name
        assert "-" not in row[:4], name  # every method is concerned by the four options of how a pass runs


@pytest.mark.parametrize("first", ["Vanilla", "vanilla", "`vanilla`, input_x_gradient", "`vanilla` `input_x_gradient`",
                                   "`vanilla`; `input_x_gradient`", "`Vanilla`"])
def test_a_row_whose_methods_cannot_be_read_fails(first):
    """A first cell that is not only backquoted method names, comma-separated, fails the reader, rather than the row
    being left out (or a name in it) while the doc goes on saying it."""
    table = [["method", *OPTIONS], [first, *["applied"] * len(OPTIONS)], ["`rise`", *["applied"] * len(OPTIONS)]]
    with pytest.raises(AssertionError, match="method names"):
        _matrix(table)
    assert _matrix([table[0], ["`vanilla`, `input_x_gradient`", *["applied"] * len(OPTIONS)]])[1] == {
        "vanilla": "AAAAA", "input_x_gradient": "AAAAA"}


# the second table's columns (how each method applies them) and the options they are
HOW = {"layout": "memory_format", "compiled forward": "compile", "autocast": "precision"}


def test_the_how_table_agrees_with_the_matrix():
    """The second table of the section: a cell that begins with "yes" is an option applied, one with "no" an option
    warned about (others say how, "plain passes", and are not read); each of its methods is in the matrix."""
    header, *rows = TABLES[1]
    assert header == ["method", *HOW], header
    read = 0
    for row in rows:
        names = [n for n in _names(row[0]) if n in MATRIX]
        for name in names:
            for column, cell in zip(header[1:], row[1:]):
                word = re.match(r"(yes|no)\b", cell)
                if word:
                    expected = {"yes": "A", "no": "W"}[word.group(1)]
                    assert MATRIX[name][OPTIONS.index(HOW[column])] == expected, (name, column, cell[:40])
                    read += 1
    assert {n for row in rows for n in _names(row[0])} >= set(NAMES)
    assert read == 58, read  # 20 methods x 3 columns, less SmoothGrad's and IG's compiled forward, "plain passes"


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_each_option_is_applied_or_said(name, option):
    applied, said = _observe(name, option)
    ours = [w for w in said if str(w.message).startswith(f"{name}: {option}=")]
    assert applied or ours or name in ONE_PASS and option == "chunks", f"{name} ignores {option} without a word"
    expected = MATRIX[name][OPTIONS.index(option)]
    assert (applied, bool(ours)) == {"A": (True, False), "W": (False, True), "-": (False, False)}[expected]
    if ours:  # one warning, at the user's line (this file's: the call in _observe)
        assert len(ours) == 1 and issubclass(ours[0].category, UserWarning) and ours[0].filename == __file__
        assert "is not applied to its passes" in str(ours[0].message)


def test_defaults_say_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in NAMES:
            _call(name, _model(name), _x(name))


@pytest.mark.parametrize("option", [{"compile": True}, {"fold_batchnorm": True}])
def test_class_model_of_a_filter_says_what_it_does_not_apply(option):
    """A target on an inner layer (``targets.activation``) is read with a hook: the ascent's passes run eagerly on the
    model itself, and say so."""
    (key, value), = option.items()
    m = _model("class_model")
    target = salience.targets.activation("features.3", 2)
    ref = salience.class_model(m, target, shape=(3, 16, 16), steps=3)
    with salience.performance(**option):
        with pytest.warns(UserWarning, match=rf"^class_model: {key}={value!r} is not applied to its passes: a target "
                                             "on an inner layer") as said:
            got = salience.class_model(m, target, shape=(3, 16, 16), steps=3)
    assert said[0].filename == __file__ and torch.equal(got, ref)
