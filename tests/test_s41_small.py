"""Session 41 small leftovers. (1) ``salience demo --n`` is capped as ``salience evaluate --n`` is (the evaluation's
``check_images``: n x 64 x 64 pixels at most ``MAX_PIXELS``), before any folder is made. (2) On an Arm CPU without
bf16 the warning names Arm's BF16 extension, not x86 instructions; an x86 ``ONEDNN_MAX_CPU_ISA`` cap does not take
an Arm CPU's BF16 away. (3) The architecture rule that imports point down sees ``importlib.import_module`` and
``__import__``."""
from __future__ import annotations

import pytest

from salience import SalienceError
from salience.evidence import evaluate
import test_s41_misc
from test_s41_misc import _bf16_warning, _cpu_with

fresh_cpu_cache = test_s41_misc.fresh_cpu_cache  # the fixture: the CPU caches cleared after each test


# ----------------------------------------------------------------------------- (1) salience demo --n


def test_demo_n_over_the_cap_is_refused_before_anything_is_made(tmp_path, monkeypatch, capsys):
    from salience.cli import main
    from salience.demo import data

    monkeypatch.setattr(data, "shapes_batch", lambda *a, **k: 1 / 0)  # before: it went on to draw 10**9 images
    out = tmp_path / "demo"
    assert main(["demo", "--n", str(10 ** 9), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # 50,000,000 // (64 * 64) = 12,207
    assert "give n at most 12,207 (salience demo --n)" in err and "the demo report holds" in err
    assert not out.exists()


def test_demo_n_at_the_cap_passes_the_check():
    evaluate.check_images(50_000_000 // 4096, (64, 64), "held-out shapes images", holder="the demo report",
                          flag="salience demo --n")
    with pytest.raises(SalienceError, match="give n at most 12,207"):
        evaluate.check_images(50_000_000 // 4096 + 1, (64, 64), "held-out shapes images")


# ----------------------------------------------------------------------------- (2) Arm's bf16 warning


@pytest.mark.usefixtures("fresh_cpu_cache")
def test_arm_without_bf16_is_told_of_arms_bf16_extension(monkeypatch, tmp_path):
    _cpu_with(monkeypatch, tmp_path, "aarch64", "Features\t: fp asimd sve")
    (message,) = _bf16_warning()
    assert "AMX" not in message and "AVX" not in message  # before: "no bf16 instructions (AMX-BF16 or AVX512-BF16)"
    assert "no BF16 extension" in message and "'bf16'" in message and "precision='fp32'" in message


@pytest.mark.usefixtures("fresh_cpu_cache")
def test_an_x86_isa_cap_leaves_arms_bf16(monkeypatch, tmp_path):
    from salience._core import cpu as _cpu

    _cpu_with(monkeypatch, tmp_path, "aarch64", "Features\t: fp asimd sve bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an x86 value: oneDNN on Arm does not read it as a cap
    assert _cpu.bf16_instructions() == "BF16" and _cpu.native_bf16() is True  # before: "" and False
    assert _bf16_warning() == []


@pytest.mark.usefixtures("fresh_cpu_cache")
def test_x86_without_bf16_still_names_x86s(monkeypatch, tmp_path):
    _cpu_with(monkeypatch, tmp_path, "x86_64", "flags\t\t: fpu sse2 avx2")
    (message,) = _bf16_warning()
    assert "no bf16 instructions (AMX-BF16 or AVX512-BF16)" in message and "a CPU with AMX-BF16" in message


# ----------------------------------------------------------------------------- (3) imports point down


_DYNAMIC_IMPORTS = (
    "import importlib\n"
    "from importlib import import_module as im\n"
    "def f(name):\n"
    "    importlib.import_module('salience.evidence.evaluate')\n"
    "    im('salience.render')\n"
    "    __import__('salience.runs')\n"
    "    __import__('salience.explore', fromlist=['x'])\n"
    "    importlib.import_module('.zoo', 'salience.demo')\n"
    "    importlib.import_module('salience._core.errors')\n"
    "    importlib.import_module(name), __import__('os'), importlib.import_module('numpy')\n"
)


def test_the_imports_rule_sees_import_module_and_dunder_import(tmp_path):
    """Read as a module of ``salience.methods``: each dynamic import of a salience module is found (its line and
    module), another package's or a name that is not a constant is not; those of a room above are refused."""
    from test_architecture import ALLOWED, _imports, _ok

    probe = tmp_path / "probe.py"
    probe.write_text(_DYNAMIC_IMPORTS)
    found = sorted(_imports(probe))
    assert found == [(4, "salience.evidence.evaluate"), (5, "salience.render"), (6, "salience.runs"),
                     (7, "salience.explore"), (8, "salience.demo.zoo"), (9, "salience._core.errors")]
    allowed = ALLOWED["salience.methods"]
    assert [n for n, t in found if not _ok(t, allowed)] == [4, 5, 6, 7, 8]  # before: none was seen
