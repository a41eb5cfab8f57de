"""The README's "Goals" table (one row per speed / memory goal) quotes its figures from the tables it links, and
docs/performance.md's "Current status" says the same of each goal.

Every decimal figure of a row's "latest figure" cell is followed, in that cell, by a link, and appears as written in
the file the link names (in the linked heading's section where the link has an anchor): a figure typed by hand, or
one the table does not hold, fails. Every link of the table leads to a file and heading that exist. The status
summary at the top of performance.md has the README's rows (issue, goal, status), in the same order."""
from __future__ import annotations

import re
from pathlib import Path

from test_s41_choosing_options import FIGURE, LINK, _anchor, source, unsourced

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PERF = ROOT / "docs" / "performance.md"
LOG = ROOT / "docs" / "performance-log.md"  # the measurement history, moved out of performance.md
HEADER = "| issue | goal | latest figure"


def table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table of ``text`` whose header line starts with ``header``."""
    start = text.index(header)
    lines = text[start:].split("\n\n", 1)[0].splitlines()
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:] if line.startswith("|")]


def test_every_figure_of_the_goals_table_is_in_the_table_it_links():
    rows = table(README.read_text(encoding="utf-8"), HEADER)
    assert len(rows) >= 20, len(rows)
    wrong, checked = [], 0
    for row in rows:
        assert len(row) == 6, row
        assert not FIGURE.findall(re.sub(r"`[^`]*`", " ", row[4])), f"a figure in the status cell, unchecked: {row}"
        w, c = unsourced(row[2], README)
        wrong += [f"issue {row[0]}, {row[1][:40]!r}: {x}" for x in w]
        checked += c
    assert checked >= 80, checked
    assert not wrong, "\n".join(wrong)


def test_every_link_of_the_goals_table_leads_somewhere():
    text = README.read_text(encoding="utf-8")
    headings = {_anchor(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}
    for row in table(text, HEADER):
        for cell in row:
            for m in LINK.finditer(cell):
                if m.group(1):
                    source(m.group(1), m.group(2), README)  # raises where the file or the heading is missing
                else:
                    assert m.group(2) in headings, m.group(0)


def test_a_figure_the_table_does_not_hold_or_without_a_link_fails():
    good = "vanilla 0.92 / 1.01 / 1.02 ([table](benchmarks/results-min2.md))"
    assert unsourced(good, README) == ([], 3)
    assert unsourced(good.replace("1.01", "1.07"), README)[0] == ["1.07: not in benchmarks/results-min2.md#"]
    wrong, _ = unsourced(good + "; IG 0.98", README)
    assert wrong == ["0.98: no link after it in " + repr((good + "; IG 0.98")[:60])]


def test_performance_md_status_matches_the_readme_goals():
    readme = [(r[0], r[1], r[4]) for r in table(README.read_text(encoding="utf-8"), HEADER)]
    text = PERF.read_text(encoding="utf-8")
    status = text.split("\n## ", 2)[1]
    assert status.startswith("Current status"), status[:40]
    assert text.index("## Current status") < text.index("## Choosing options")
    rows = [(r[0], r[1], r[2]) for r in table(status, "| issue | goal | status")]
    assert rows == readme


def test_the_readme_speed_section_is_no_session_log():
    text = README.read_text(encoding="utf-8")
    speed = text.split("## Speed and memory", 1)[1].split("\n## ", 1)[0]
    paragraphs = [p for p in re.split(r"\n\s*\n", speed) if not p.lstrip().startswith("|")]
    assert not [p[:60] for p in paragraphs if re.match(r"\s*(Since )?[Ss]ession \d", p)]
    history = LOG.read_text(encoding="utf-8").split("## History: the README's speed section", 1)[1]
    for kept in ("Session 43: Ablation-CAM's layers before the layer", "1.006-1.098x in four rounds",
                 "Captum at 0.97-0.99 of salience's time in every round"):
        assert kept in " ".join(history.split()), kept
