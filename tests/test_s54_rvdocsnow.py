"""Review of session 54's docs rewrite (docs/performance.md to the present, its history moved to
docs/performance-log.md, the method pages without session history): what the rewritten pages state must be true of
the code, and a figure that a rewritten page sources in the log must be in the section it links.
"""
from __future__ import annotations

import re
from pathlib import Path

from test_s41_choosing_options import FIGURE, LINK, section

from salience._core import compiled, folding

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LOG = DOCS / "performance-log.md"
PAGES = ["performance.md", "methods-perturbation.md", "methods-smoothgrad-ig.md", "methods-cams.md",
         "methods-transformers.md", "models.md"]


def items(text: str) -> list[str]:
    """The paragraphs and list items of a page (code blocks left out): the unit a figure and its link share."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [i for block in re.split(r"\n\s*\n", text) for i in re.split(r"\n(?=\s*- )", block) if i.strip()]


def log_figures_missing(text: str) -> tuple[list[str], int]:
    """The figures of ``text`` placed just before a link into performance-log.md (after the link before it in the
    same paragraph or list item) that the linked section does not hold as written; and how many were checked."""
    log = LOG.read_text(encoding="utf-8")
    wrong, checked = [], 0
    for item in items(text):
        start = 0
        for m in LINK.finditer(item):
            chunk, start = item[start:m.start()], m.end()
            if not m.group(1).endswith("performance-log.md") or not m.group(2):
                continue
            held = section(log, m.group(2))
            for f in FIGURE.findall(re.sub(r"`[^`]*`", " ", chunk)):
                checked += 1
                if not re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", held):
                    wrong.append(f"{f}: not in performance-log.md#{m.group(2)}")
    return wrong, checked


def test_the_checker_finds_a_figure_the_linked_log_section_does_not_hold():
    good = "folded maps within about 5e-7 of their largest value ([log](performance-log.md#fold_batchnorm))"
    assert log_figures_missing("mallopt costs 0.26 ms ([log](performance-log.md#fold_batchnorm))")[0] == \
        ["0.26: not in performance-log.md#fold_batchnorm"]
    assert log_figures_missing("0.999 ([t](../benchmarks/x.md)), 0.26 ms ([log](performance-log.md#fold_batchnorm))"
                               )[0] == ["0.26: not in performance-log.md#fold_batchnorm"]  # 0.999 is the table's
    assert log_figures_missing(good) == ([], 1)


def test_each_figure_the_rewritten_pages_source_in_the_log_is_in_the_section_they_link():
    """methods-perturbation.md gave the state record's cost (0.26 ms a call, 44 us a pass) with a link to the log's
    "state record's gaps", which does not hold it (it is in "recurrent state in occlusion")."""
    wrong, checked = [], 0
    for name in PAGES:
        w, c = log_figures_missing((DOCS / name).read_text(encoding="utf-8"))
        wrong += [f"{name}: {x}" for x in w]
        checked += c
    assert checked >= 3, checked
    assert not wrong, "\n".join(wrong)


def test_the_cache_sizes_performance_md_states_are_the_codes():
    """performance.md said the compiled models are cached for "the last 4 models": the code keeps 6 entries
    (a model under compile="freeze" takes three), since 515d8dc3."""
    text = " ".join((DOCS / "performance.md").read_text(encoding="utf-8").split())
    kept = re.search(r"the compiled model is cached for the process \(the last (\d+)", text)
    assert kept and int(kept.group(1)) == compiled._COMPILED_KEEP, kept and kept.group(0)
    folded = re.search(r"cached for the process \(the last (\d+) models, per precision\)", text)
    assert folded and int(folded.group(1)) == folding._FOLDED_KEEP, folded and folded.group(0)
