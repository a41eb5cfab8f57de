"""docs/performance.md's "Choosing options" (which options for which job and machine) quotes its figures from the
benchmark tables and doc sections it links, exactly: every decimal figure of a table cell or paragraph is followed,
in the same cell, by a link, and appears as written in the file the link names (in the linked heading's section
where the link has an anchor; the guide's own section left out). A figure without a link after it, or one its
source does not hold, fails. And the guide's table has a row for each machine of each job; README links it."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
SECTION = "## Choosing options"
MACHINES = ("CPU with AMX-BF16", "CPU without AMX-BF16", "CUDA")
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]*)(?:#([^)\s]+))?\)")
FIGURE = re.compile(r"(?<![\w.])(?:\d+\.\d+(?:e-\d+)?|\d+e-\d+)(?![\w.]*\d)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def guide(text: str) -> str:
    """The "Choosing options" section of performance.md's ``text``."""
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    return SECTION + text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def _anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def section(text: str, anchor: str) -> str:
    """The text under the heading whose GitHub anchor is ``anchor``, to the next heading of its level or higher."""
    lines = FENCE.sub("", text).splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s+(.*)$", line)
        if m and _anchor(m.group(2)) == anchor:
            end = next((j for j in range(i + 1, len(lines))
                        if re.match(rf"^#{{1,{len(m.group(1))}}}\s", lines[j])), len(lines))
            return "\n".join(lines[i:end])
    raise AssertionError(f"no heading with the anchor #{anchor}")


def source(target: str, anchor: str | None, base: Path = DOC) -> str:
    """The text a link of ``base`` (the guide by default) names: a file relative to ``base``'s folder, ``base``
    itself when ``target`` is empty (the guide's own file without the guide)."""
    path = (base.parent / target).resolve() if target else base
    assert path.exists(), f"link to {target}: no such file"
    text = path.read_text(encoding="utf-8")
    if path == DOC:
        text = text.replace(guide(text), "")
    return section(text, anchor) if anchor else text


def pieces(text: str) -> list[str]:
    """The guide's table cells and paragraphs (code blocks left out), each a piece whose figures its links source."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", FENCE.sub("", text)):
        if block.lstrip().startswith("|"):
            out += [cell for row in block.splitlines() for cell in row.strip().strip("|").split("|")]
        else:
            out.append(" ".join(block.split()))
    return out


def unsourced(text: str, base: Path = DOC) -> tuple[list[str], int]:
    """The figures of ``text``'s pieces that no following link's source holds as written, and how many were
    checked; links are read relative to ``base`` (the guide by default). Inline code is no figure (``bf16``,
    ``--n 240``)."""
    wrong, checked = [], 0
    for piece in pieces(text):
        start = 0
        for m in [*LINK.finditer(piece), None]:
            chunk = piece[start:m.end() if m else len(piece)]
            figures = FIGURE.findall(re.sub(r"`[^`]*`", " ", LINK.sub(" ", chunk)))
            if m is None:
                wrong += [f"{f}: no link after it in {piece[:60]!r}" for f in figures]
                break
            held = source(m.group(1), m.group(2), base)
            for f in figures:
                checked += 1
                if not re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", held):
                    wrong.append(f"{f}: not in {m.group(1) or base.name}#{m.group(2) or ''}")
            start = m.end()
    return wrong, checked


def test_every_figure_of_the_guide_is_in_the_source_it_links():
    text = DOC.read_text(encoding="utf-8")
    assert text.index(SECTION) < text.index("## How to set them")  # at the top, before the reference sections
    wrong, checked = unsourced(guide(text))
    assert checked >= 100, checked
    assert not wrong, "\n".join(wrong)


def test_a_figure_that_its_source_does_not_hold_or_that_has_no_link_fails():
    good = "| SmoothGrad 16 0.755 at 1 image ([fold_batchnorm](#fold_batchnorm)) |"
    assert unsourced(good) == ([], 1)
    wrong, _ = unsourced(good.replace("0.755", "0.754"))
    assert wrong == ["0.754: not in performance.md#fold_batchnorm"]
    wrong, _ = unsourced("| Score-CAM 16.2 s ([t](../benchmarks/perturbation-resnet50-bf16-scorecam-rise.md)), RISE 16.3 s |")
    assert len(wrong) == 1 and wrong[0].startswith("16.3: no link after it")
    wrong, _ = unsourced("| 0.968-0.975 ([memory_format](#memory_format)) |")  # Lite0's, not that section's
    assert len(wrong) == 2


def test_each_job_has_a_row_for_each_machine_and_the_readme_links_the_guide():
    rows = [r.strip().strip("|").split("|") for r in guide(DOC.read_text(encoding="utf-8")).splitlines()
            if r.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    assert header[:2] == ["job", "machine"], header
    jobs: dict[str, list[str]] = {}
    job = ""
    for row in rows[1:]:
        if len(row) != len(header):
            break  # the next table (the defaults)
        job = row[0].strip() or job
        jobs.setdefault(job, []).append(row[1].strip())
    assert len(jobs) == 5, list(jobs)
    for job, machines in jobs.items():
        assert [next(m for m in MACHINES if c.startswith(m)) for c in machines] == list(MACHINES), job
    assert "](docs/performance.md#choosing-options)" in (ROOT / "README.md").read_text(encoding="utf-8")
