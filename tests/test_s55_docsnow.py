"""The README's Goals table gives per goal the latest measurements that decide its status, not a session log; the
figures it dropped are kept, each with its link, in docs/performance-log.md; docs/datasets.md and docs/cli.md state
what is, without narrating sessions.

- A "latest figure" cell is at most N characters as rendered (a link counted as its text), N the number the table's
  HTML comment states (400: the longest cell reached is 382).
- The status and "CPU, when" cells name no session (the date says when), and the status cells of
  docs/performance.md's Current status, which repeat them, neither.
- performance-log.md's "README Goals table before session 55" holds the table as it was: every decimal figure of it
  is in the file its link names (as tests/test_s44_readme_goals.py checks the README's), and figures the README no
  longer gives are there with the link that sources them.
- docs/datasets.md (but its Ray section) and docs/cli.md say "session N" nowhere but in file names and link targets.
"""
from __future__ import annotations

import re
from pathlib import Path

from test_s41_choosing_options import LINK, unsourced
from test_s44_readme_goals import HEADER, table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LOG = ROOT / "docs" / "performance-log.md"
MOVED = "## README Goals table before session 55"
SESSION = re.compile(r"\b(?:this session|sessions? \d+)", re.I)

# Figures the README's Goals table gave before and gives no more, each with the link that followed it (from the log).
DROPPED = [
    ("0.99 / 1.00 / 1.00 (as fast: the same passes)", "../benchmarks/results-min2.md"),
    ("0.973 / 1.025 / 1.089", "../benchmarks/deconvnet-s46.md"),
    ("0.911, 0.921, 0.915", "../benchmarks/perturbation-resnet50-8images-bf16-s43-mem.md"),
    ("86.18 MiB against the loop's 85.94", "../benchmarks/perturbation-resnet50-8images-s46-mem.md"),
    ("6.4-8.1x faster than both per round", "methods-perturbation.md#speed-and-memory"),
    ("1.054, 1.392, 1.098, 1.006, 1.092", "../benchmarks/dataset-2000-writer.md"),
    ("IG 0.651 / 0.711 / 0.818", "performance.md#fold_batchnorm"),
    ("1.274, 1.492, 1.820", "../benchmarks/s45b-summary.md"),
    ("1.172, 1.102, 1.160, 1.184, 1.191", "../benchmarks/auto-declines-s49-b.md"),
    ("1.132, 1.039, 0.967, 1.128, 1.053", "../benchmarks/engine-speed-s46-sg-1-4-8.md"),
]


def rendered(cell: str) -> str:
    """A table cell as a reader sees it: each markdown link as its text."""
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell)


def goals() -> list[list[str]]:
    return table(README.read_text(encoding="utf-8"), HEADER)


def moved_section() -> str:
    text = LOG.read_text(encoding="utf-8")
    assert MOVED in text, f"{LOG.name} has no section {MOVED!r}"
    return text.split(MOVED, 1)[1].split("\n## ", 1)[0]


def test_each_latest_figure_cell_is_at_most_the_length_the_tables_comment_states():
    text = README.read_text(encoding="utf-8")
    comment = text[text.index("<!-- To edit: one row per goal."):text.index(HEADER)]
    stated = re.search(r"at most (\d+) characters as rendered", " ".join(comment.split()))
    assert stated, "the Goals table's comment states no length for the figure cells"
    most = int(stated.group(1))
    assert most <= 400, most
    long = [(r[0], r[1][:40], len(rendered(r[2]))) for r in goals() if len(rendered(r[2])) > most]
    assert not long, long


def test_no_status_or_when_cell_names_a_session():
    rows = goals()
    assert len(rows) >= 20, len(rows)
    said = [(r[0], r[1][:40], c) for r in rows for c in (r[3], r[4]) if re.search(r"\bsession", c, re.I)]
    assert not said, said
    perf = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    status = perf.split("## Current status", 1)[1].split("\n## ", 1)[0]
    rows = table(status, "| issue | goal | status")
    assert len(rows) == len(goals())
    assert not [r[2] for r in rows if re.search(r"\bsession", r[2], re.I)]
    intro = status.split("| issue |", 1)[0]
    assert not SESSION.search(LINK.sub(" ", intro)), intro


def test_the_old_table_in_the_log_holds_every_figure_as_its_link_does():
    section = moved_section()
    rows = table(section, HEADER)
    assert len(rows) >= 25, len(rows)
    wrong, checked = unsourced("\n".join(f"| {r[2]} |" for r in rows), LOG)
    assert checked >= 300, checked
    assert not wrong, "\n".join(wrong)


def test_each_dropped_figure_is_in_the_log_with_its_link():
    section = " ".join(moved_section().split())
    readme = " ".join(README.read_text(encoding="utf-8").split())
    goals_text = readme.split(HEADER, 1)[1].split("**Which CPU.**", 1)[0]
    for figure, target in DROPPED:
        assert figure not in goals_text, f"{figure!r} is still in the README's Goals table"
        at = section.find(figure)
        assert at >= 0, f"{figure!r} is not in the log's {MOVED!r}"
        following = LINK.search(section, at + len(figure))
        assert following, figure
        assert following.group(1) + (f"#{following.group(2)}" if following.group(2) else "") == target, \
            (figure, following.group(0))


def _without_ray(text: str) -> str:
    start = text.index("## Beyond one machine: Ray")
    rest = text[start + 3:]
    end = rest.find("\n## ")
    return text[:start] + (rest[end:] if end >= 0 else "")


def test_datasets_and_cli_docs_narrate_no_session():
    for name, keep in (("datasets.md", _without_ray), ("cli.md", lambda t: t)):
        text = keep((ROOT / "docs" / name).read_text(encoding="utf-8"))
        prose = LINK.sub(lambda m: m.group(0).split("](", 1)[0], text)  # link targets (anchors) left out
        said = [" ".join(m.string[max(0, m.start() - 40):m.end() + 20].split()) for m in SESSION.finditer(prose)]
        assert not said, f"{name}: {said}"


def test_the_checks_catch_a_session_a_long_cell_and_a_link_target():
    assert SESSION.search("until session 53 it was an internal error")
    assert SESSION.search("measured in sessions 39 and 40")
    assert not SESSION.search("`tests/test_s43_top_named.py`, the AWS_SESSION_TOKEN")
    link = "[log](performance-log.md#session-39-the-command-lines-allocator)"
    assert not SESSION.search(LINK.sub(lambda m: m.group(0).split("](", 1)[0], link))
    assert rendered("0.98 ([table](benchmarks/results-min2.md))") == "0.98 (table)"
