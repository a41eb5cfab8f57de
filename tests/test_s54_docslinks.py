"""Every relative link of README.md and docs/*.md leads somewhere: the file exists and, for ``#anchor``, a heading of
that file gives that anchor as GitHub makes it (or an HTML ``id`` / ``name`` there).

GitHub's anchor of a heading: the heading's rendered text (inline code's backticks, a link's target, HTML tags and
emphasis marks gone), lowercased, every character that is not a letter, digit, space, ``-`` or ``_`` dropped, spaces
turned to ``-``; a heading whose anchor an earlier heading of the page already took gets ``-1``, ``-2``, ... after it.
tests/test_s39_docs_truth.py checks inline links with a simpler slug (no rendered text, no repeats); this file adds
reference-style links (``[x]: target``), headings with links or HTML in them, repeated headings, links outside code
only, and the latest figure of each goal in docs/performance.md's "Current status" found in the table it links.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from test_s41_choosing_options import unsourced

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:id|name)=[\"']([^\"']+)[\"']", re.I)


def rendered(heading: str) -> str:
    """The text GitHub renders for a heading's markdown: code spans' backticks, a link's target, an image's
    address and HTML tags gone (``*`` goes with the punctuation; an ``_`` is kept, as in code: no heading of these
    pages uses ``_emphasis_``)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"`+", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of one heading (without the suffix of a repeated one)."""
    text = rendered(heading).strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


@functools.lru_cache(maxsize=None)
def file_anchors(path: Path) -> frozenset[str]:
    """:func:`anchors` of the page at ``path``, read once."""
    return frozenset(anchors(path.read_text(encoding="utf-8")))


def anchors(text: str) -> set[str]:
    """Every anchor of a markdown page: its headings' (repeats numbered as GitHub numbers them) and its HTML ids."""
    text = FENCE.sub("", text)
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, heading in HEADING.findall(text):
        base = slug(heading)
        name = base
        while name in out:
            seen[base] = seen.get(base, 0) + 1
            name = f"{base}-{seen[base]}"
        out.add(name)
    return out | set(HTML_ANCHOR.findall(text))


def links(text: str) -> list[str]:
    """The link targets of a markdown page outside code: inline links, images and reference definitions."""
    prose = INLINE_CODE.sub(" ", FENCE.sub("", text))
    return [*INLINE_LINK.findall(prose), *REFERENCE.findall(prose)]


def broken(path: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``path`` whose file or anchor does not exist, as ``page: target: why`` (``page``
    relative to ``root``)."""
    wrong = []
    for target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][\w+.-]*:", target, re.I) or target.startswith("//"):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file) if file else path
        if not dest.exists():
            wrong.append(f"{path.relative_to(root)}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in file_anchors(dest.resolve()):
            wrong.append(f"{path.relative_to(root)}: {target}: no heading with that anchor")
    return wrong


def test_the_slug_is_githubs_on_known_headings():
    assert slug("Why `auto` and `throughput` are not the defaults") == "why-auto-and-throughput-are-not-the-defaults"
    assert slug('compile="freeze"') == "compilefreeze"
    assert slug("Where the error comes from, and `precision=\"bf16-mixed\"` (session 41)") == \
        "where-the-error-comes-from-and-precisionbf16-mixed-session-41"
    assert slug("History: the README's speed section through session 43") == \
        "history-the-readmes-speed-section-through-session-43"
    assert slug("fold_batchnorm") == "fold_batchnorm"
    assert slug("The allocator (`--allocator`, \"reuse\" is the command's default)") == \
        "the-allocator---allocator-reuse-is-the-commands-default"
    assert slug("See [the table](x.md#y) and <code>here</code>") == "see-the-table-and-here"


def test_repeated_headings_are_numbered_and_code_blocks_have_none():
    page = "# Speed\n\n## Speed\n\n```\n# not a heading\n```\n\n### Speed\n\n<a id=\"kept\"></a>\n"
    assert anchors(page) == {"speed", "speed-1", "speed-2", "kept"}


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "b.md").write_text("# Here\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#twice-1) [top](#top) [code `x`](b.md#here) `[no](c.md)`\n\n# Top\n\n"
                    "[gone](c.md) [bad](b.md#twice-2) ![img](pic.png) [web](https://x.org/#y)\n\n"
                    "```\n[in code](nowhere.md)\n```\n\n[ref]: b.md#nowhere\n", encoding="utf-8")
    assert broken(page, tmp_path) == ["a.md: c.md: no such file", "a.md: b.md#twice-2: no heading with that anchor",
                                      "a.md: pic.png: no such file", "a.md: b.md#nowhere: no heading with that anchor"]


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    wrong, seen = [], 0
    for path in DOCS:
        seen += len(links(path.read_text(encoding="utf-8")))
        wrong += broken(path)
    assert seen > 500, seen
    assert not wrong, "\n".join(wrong)


def test_each_goals_latest_figure_in_performance_md_is_in_the_table_it_links():
    perf = ROOT / "docs" / "performance.md"
    status = perf.read_text(encoding="utf-8").split("## Current status", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in status.splitlines() if r.startswith("| ") and not r.startswith("| issue")]
    assert len(rows) >= 20, len(rows)
    cells = [r.strip().strip("|").split("|")[3] for r in rows]
    assert all(c.strip() for c in cells)
    wrong, checked = unsourced("\n\n".join(cells), perf)
    assert checked >= 80, checked
    assert not wrong, "\n".join(wrong)
