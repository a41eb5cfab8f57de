"""The docs are true: what README.md and docs/*.md show a user to copy works and does what they say.

Read from the documents themselves, against the real objects (nothing here keeps a list of flags or names):

* every ``salience COMMAND ...`` names a command of the real parser, and each of its ``--flags`` is a flag of that
  command (a value of a flag with choices is one of them); the complete command lines of the code blocks parse;
* every other ``--flag`` written is a flag of some parser: salience's commands, ``salience.demo.train``, the
  examples' or the benchmarks' scripts (read from their ``add_argument`` calls), or of the few other tools the
  docs name (pytest, pip, hf, ray);
* every ``salience.NAME...`` and ``from salience... import NAME`` resolves; the README's method table names every
  method of ``salience.METHODS``; a signature written ``name(a, *, b=1)`` has the real parameters, in order, with
  those defaults; docs/cli.md's method-option table says which methods take each flag;
* the cheap Python snippets run, statement by statement, on a tiny model, and each ``# (B, H, W)``-style comment
  of an assignment is the shape of what it assigned.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import re
import shlex
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from salience.cli import build_parser
from salience.methods.options import method_options

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FLAG = re.compile(r"(?<![\w\-/=.])--[a-z][\w-]*")
COMMAND = re.compile(r"(?:^|&&|;|\|)\s*(?:[A-Z_]+=\S*\s+)*(?:salience|python -m salience)\s+([a-z][\w-]*)([^#|;&]*)")
OTHER_TOOLS = {"--dist": r"pytest|-n \d", "--no-deps": r"\bpip\b", "--revision": r"\bhf download\b",
               "--cache-dir": r"\bhf download\b", "--head": r"\bray start\b"}
"""Flags of the other tools the docs name (pytest-xdist, pip, hf, ray start), not salience's: each allowed only on
a line that names its tool (a salience ``--revision`` is not)."""


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """The fenced code blocks of ``path``: (language, body, line of the fence)."""
    text = _text(path)
    return [(m.group(1), m.group(2), text[:m.start()].count("\n") + 1) for m in BLOCK.finditer(text)]


def snippets(path: Path) -> Iterator[tuple[str, str, bool]]:
    """Every code block's lines (continuation lines joined) and every inline code span outside them:
    (where, text, whether it is a code block's line)."""
    text = _text(path)
    for lang, body, line in blocks(path):
        for i, piece in enumerate(body.replace("\\\n", " ").splitlines()):
            yield f"{path.name}:{line + 1 + i}", piece, True
    rest = BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in re.finditer(r"`([^`]+)`", rest):
        yield f"{path.name}:{rest[:m.start()].count(chr(10)) + 1}", " ".join(m.group(1).split()), False


def commands() -> Iterator[tuple[str, str, str, bool]]:
    """Every ``salience COMMAND rest`` of the docs: (where, command, rest without its comment, in a block)."""
    for path in DOCS:
        for where, text, in_block in snippets(path):
            for m in COMMAND.finditer(text):
                if not m.group(1).isupper():  # `salience COMMAND ...`: the placeholder
                    yield where, m.group(1), m.group(2), in_block


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _flags_of(source: Path) -> set[str]:
    """The ``--flags`` a script's ``add_argument`` calls define, and those a benchmark makes of its module's
    ``CONFIG = {...}`` keys (``--peer-batch``): read, not run."""
    found = set()
    for node in ast.walk(ast.parse(_text(source))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(getattr(t, "id", "") == "CONFIG" for t in node.targets)):
            found |= {"--" + k.value.replace("_", "-") for k in node.value.keys if isinstance(k, ast.Constant)}
    return found


def _is_value(word: str) -> bool:
    """A flag's written value rather than a placeholder (``NAME``, ``a|b``, ``...``)."""
    return bool(word) and not word.startswith("-") and word.lower() == word and "|" not in word and "..." not in word


def test_every_salience_command_names_a_real_command_and_its_flags():
    subs, seen, wrong, flags, values = subcommands(), 0, [], 0, 0
    for where, command, rest, _ in commands():
        seen += 1
        if command not in subs:
            wrong.append(f"{where}: salience {command}: no such command ({', '.join(subs)})")
            continue
        actions = subs[command]._option_string_actions
        words = rest.split()
        for i, word in enumerate(words):
            flag = word.split("=", 1)[0].strip("[]()`,;.")
            if not FLAG.fullmatch(flag):
                continue
            flags += 1
            if flag not in actions:
                wrong.append(f"{where}: salience {command} has no {flag}")
                continue
            choices = actions[flag].choices
            value = word.split("=", 1)[1] if "=" in word else (words[i + 1] if i + 1 < len(words) else "")
            value = value.strip("`,;")
            values += bool(choices and _is_value(value))
            if choices and _is_value(value) and value not in choices:
                wrong.append(f"{where}: salience {command} {flag} {value}: not one of {sorted(choices)}")
    assert seen > 50 and flags > 120 and values >= 5, f"{seen} commands, {flags} flags, {values} values of choices: " \
        "the reader of the docs is broken"
    assert not wrong, "\n".join(wrong)


def test_the_complete_command_lines_of_the_code_blocks_parse(capsys):
    parser, parsed, wrong = build_parser(), 0, []
    for where, command, rest, in_block in commands():
        if not in_block or "..." in rest or re.search(r"\b[A-Z]{2,}\b", rest):
            continue  # an elided or placeholder line: its flags are checked above
        try:
            parser.parse_args([command, *shlex.split(rest)])
            parsed += 1
        except SystemExit as done:  # `--help` exits 0 (its text on stdout): a line that parses
            parsed += done.code == 0
            if done.code != 0:
                wrong.append(f"{where}: salience {command}{rest}: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert parsed > 30, parsed
    assert not wrong, "\n".join(wrong)


def test_every_flag_written_is_a_flag_of_some_parser():
    known: set[str] = set()
    for sub in subcommands().values():
        known |= {f for f in sub._option_string_actions if f.startswith("--")}
    for script in [ROOT / "src/salience/demo/train.py", *(ROOT / "examples").glob("*.py"),
                   *(ROOT / "benchmarks").glob("*.py")]:
        known |= _flags_of(script)
    wrong, seen, tools = [], 0, set()
    for path in DOCS:
        text = re.sub(r"unrecognized arguments:\s+--[\w-]+", "", _text(path))  # cli.md's example of a wrong flag
        for i, line in enumerate(text.splitlines(), 1):
            for flag in FLAG.findall(line):
                seen += 1
                if flag in OTHER_TOOLS and flag not in known and re.search(OTHER_TOOLS[flag], line):
                    tools.add(flag)
                elif flag not in known and flag not in ("--x", "--no-x"):  # cli.md: `--x` / `--no-x`, the pattern
                    wrong.append(f"{path.name}:{i}: {flag}")
    assert seen > 700, seen
    assert tools == set(OTHER_TOOLS), f"allowed for other tools but not written: {set(OTHER_TOOLS) - tools}"
    assert not wrong, "flags no parser has:\n" + "\n".join(wrong)


SCRIPT = re.compile(r"python3? (?:-m salience\.demo\.train|((?:benchmarks|examples)/\w+\.py))([^#|;&]*)")


def test_a_script_command_has_that_scripts_flags():
    """``python benchmarks/x.py --flag`` / ``examples/x.py`` / ``-m salience.demo.train``: a flag of that script,
    not only of some parser (the test above)."""
    wrong, commands, flags = [], 0, 0
    for path in DOCS:
        for where, text, _ in snippets(path):
            for m in SCRIPT.finditer(text):
                script = ROOT / (m.group(1) or "src/salience/demo/train.py")
                if not script.exists():
                    wrong.append(f"{where}: {m.group(1)}: no such script")
                    continue
                own, commands = _flags_of(script), commands + 1
                for flag in FLAG.findall(m.group(2)):
                    flags += 1
                    if flag not in own:
                        wrong.append(f"{where}: {script.name} has no {flag}")
    assert commands > 50 and flags > 200, (commands, flags)  # 65 and 252
    assert not wrong, "\n".join(wrong)


def test_the_demo_training_commands_name_real_models():
    from salience.demo.train import CONFIGS
    names = [m.group(1) for path in DOCS for _, text, _ in snippets(path)
             for m in re.finditer(r"python -m salience\.demo\.train\s+([\w-]+)", text)]
    names = [n for n in names if not n.isupper()]  # `python -m salience.demo.train NAME`
    assert len(names) >= 5 and set(names) <= set(CONFIGS), names



def _anchors(path: Path) -> set[str]:
    """The link anchors of ``path``'s headings, as GitHub makes them."""
    text = BLOCK.sub("", _text(path))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower().replace("`", "")).replace(" ", "-")
            for h in re.findall(r"^#+\s+(.*)$", text, re.M)}


REPO_PATH = re.compile(r"(?<![\w/.-])((?:tests|benchmarks|examples|src|docs|\.ci)/[\w./<>*-]*[\w*>])")


def test_every_link_file_anchor_and_package_path_exists():
    wrong, seen = [], 0
    for path in DOCS:
        text = _text(path)
        for m in re.finditer(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", text):
            if m.group(1).startswith(("http:", "https:")):
                continue
            target = path.parent / m.group(1) if m.group(1) else path
            seen += 1
            if not target.exists():
                wrong.append(f"{path.name}: link to {m.group(1)}: no such file")
            elif m.group(2) and target.suffix == ".md" and m.group(2) not in _anchors(target):
                wrong.append(f"{path.name}: link to {m.group(1)}#{m.group(2)}: no such heading")
        for m in re.finditer(r"`(salience/[\w/<>.*-]+)`", text):  # salience/cli/options.py, salience/x/<name>.pt
            seen += 1
            if not list((ROOT / "src").glob(re.sub(r"<[^>]+>", "*", m.group(1)))):
                wrong.append(f"{path.name}: {m.group(1)}: no such file in src/")
        for where, code, _ in snippets(path):  # tests/x.py, benchmarks/x.md, `--out benchmarks/x` (x.md, x.json)
            for m in REPO_PATH.finditer(code):
                seen += 1
                pattern = re.sub(r"<[^>]+>", "*", m.group(1))
                if not any(list(ROOT.glob(p)) for p in (pattern, pattern + ".*", pattern + "-*")):
                    wrong.append(f"{where}: {m.group(1)}: no such file in the repository")
    assert seen > 350, seen  # 100 links and salience/ paths, 273 repository paths
    assert not wrong, "\n".join(wrong)


def test_every_table_has_its_header_row():
    """A table row after a blank line starts a table of its own, which Markdown does not draw without a
    ``|---|`` line under it: the row shows as text."""
    wrong, tables = [], 0
    for path in DOCS:
        lines = [line.lstrip() for line in  # a table in a list item is indented
                 BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), _text(path)).splitlines()]
        for i, line in enumerate(lines):
            row = line.startswith("|") and line.rstrip().endswith("|")
            if row and (i == 0 or not lines[i - 1].startswith("|")):
                tables += 1
                if i + 1 >= len(lines) or not re.match(r"^\|\s*:?-", lines[i + 1]):
                    wrong.append(f"{path.name}:{i + 1}: {line[:60]}")
    assert tables > 30, tables
    assert not wrong, "rows outside a table:\n" + "\n".join(wrong)


def resolve(dotted: str) -> bool:
    """Whether ``dotted`` (``salience.a.b``) names something: an attribute, else a module to import."""
    obj, name = importlib.import_module("salience"), "salience"
    for part in dotted.split(".")[1:]:
        name += "." + part
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(name)
        except ImportError:
            return False
    return True


def importable(module: str, name: str) -> bool:
    """Whether ``from module import name`` works."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}") is not None


def test_every_salience_name_in_the_docs_resolves():
    wrong, seen = [], 0
    for path in DOCS:
        text = _text(path)
        names = [m.group(1) for m in re.finditer(r"(?<![\w./-])(salience(?:\.[A-Za-z_]\w*)+)", text)]
        imports = [(m.group(1), n.strip()) for m in re.finditer(r"from (salience[\w.]*) import ([\w, ]+)", text)
                   for n in m.group(2).split(",") if n.strip()]
        seen += len(names) + len(imports)
        wrong += [f"{path.name}: {n}" for n in names if not resolve(n)]
        wrong += [f"{path.name}: from {m} import {n}" for m, n in imports if not importable(m, n)]
    assert seen > 100, seen
    assert not wrong, "\n".join(wrong)


def test_the_readme_method_table_names_every_method():
    text = _text(ROOT / "README.md")
    table = re.search(r"^\| method \| paper \|.*?\n\n", text, re.S | re.M).group(0)
    names = {n.split(".")[-1] for row in table.splitlines()[2:] if row.startswith("|")
             for n in re.findall(r"`([\w.]+)`", row.split("|")[1])}
    assert all(hasattr(salience, n) for n in names), sorted(n for n in names if not hasattr(salience, n))
    assert set(salience.METHODS) <= names, sorted(set(salience.METHODS) - names)
    assert all(callable(getattr(salience, n)) or n == "keras_vis" for n in names)


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return inspect.Parameter.empty  # not a literal (salience.vanilla): not compared


def _documented_signatures() -> Iterator[tuple[str, str, str]]:
    """``name(a, b=1, *, c=2, ...)`` written in inline code, ``salience.x.name``, ``viz.name`` or a bare ``name``
    (evaluation.md's table of metrics): (where, name, arguments)."""
    for path in DOCS:
        rest = BLOCK.sub("", _text(path))
        for m in re.finditer(r"`((?:salience|viz|metrics)(?:\.\w+)+|\w+)\(([^`]*)\)`", rest):
            args = " ".join(m.group(2).replace("\\|", "|").split())  # `order="morf" \| "lerf"` in a table
            if re.search(r"(^|, )\*(,|$)", args):
                yield path.name, m.group(1), args


def _signature_owner(name: str) -> Any:
    """What a written signature's name names: a dotted name, or a bare one of salience.metrics, viz, keras_vis or
    salience itself (None: a placeholder such as README's ``method(model, x, ...)``)."""
    if "." not in name:
        homes = (salience.metrics, salience.viz, importlib.import_module("salience.keras_vis"), salience)
        return next((getattr(home, name) for home in homes if hasattr(home, name)), None)
    obj = salience
    for part in re.sub(r"^(viz|metrics)\.", r"salience.\1.", name).split(".")[1:]:
        obj = getattr(obj, part, None) or importlib.import_module(f"{obj.__name__}.{part}")
    return obj


def test_documented_signatures_have_the_real_parameters_and_defaults():
    wrong, seen = [], 0
    for where, name, args in _documented_signatures():
        obj = _signature_owner(name)
        if obj is None:
            continue
        params = inspect.signature(obj).parameters
        call = ast.parse("f(" + re.sub(r"(^|, )\*(?=,|$)", "", args).replace("...", "").strip(", ") + ")",
                         mode="eval").body
        written = [a.id for a in call.args if isinstance(a, ast.Name)] + [k.arg for k in call.keywords]
        order = [p for p in params if p in written]
        if order != written or ("..." not in args and written != list(params)):  # without "...": all of them
            wrong.append(f"{where}: {name}{written} but the signature has {list(params)}")
        for k in call.keywords:
            value, default = _literal(k.value), params[k.arg].default if k.arg in params else None
            if value is not inspect.Parameter.empty and value != default and list(np.atleast_1d(value)) != list(
                    np.atleast_1d(default)):
                wrong.append(f"{where}: {name}: {k.arg}={value!r} written, the default is {default!r}")
        seen += 1
    assert seen >= 15, seen  # 16: 7 with a dotted name, 9 bare (evaluation.md's metrics, keras-vis.md)
    assert not wrong, "\n".join(wrong)


SHORT = {"viz", "metrics", "targets", "zoo", "data", "rules", "evidence", "keras_vis"}
"""The ``from salience import NAME`` modules the docs call by their short name (``viz.figure(...)``)."""


def _called(node: ast.Call) -> Optional[Any]:
    """What a call ``salience.a.b(...)`` / ``viz.f(...)`` of a snippet calls, or None for anything else."""
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.insert(0, f.attr)
        f = f.value
    if not isinstance(f, ast.Name) or not parts or f.id not in SHORT | {"salience"}:
        return None
    obj = salience if f.id == "salience" else getattr(salience, f.id)
    for part in parts:
        obj = getattr(obj, part, None)
    return obj


def _keywords(fn: Any, node: ast.Call) -> Optional[set[str]]:
    """The keywords ``fn`` takes, those its ``**options`` hand on included (SmoothGrad's inner method's, the
    performance options, ``viz.figure``'s, ``load_model``'s); None for another ``**`` it does not know."""
    params = inspect.signature(fn).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return names
    if fn is salience.smoothgrad:
        inner = next((k.value for k in node.keywords if k.arg == "method"), None)
        inner = (salience.vanilla if inner is None else _called(ast.Call(inner, [], [])) if isinstance(
            inner, ast.Attribute) else salience.METHODS.get(getattr(inner, "value", None)))
        return None if inner is None else names | _keywords(inner, ast.Call(ast.Name("f"), [], []))
    from dataclasses import fields
    from salience._core.perf import Performance
    handed = {salience.set_performance: {f.name for f in fields(Performance)},
              salience.performance: {f.name for f in fields(Performance)},
              salience.viz.save_figure: set(inspect.signature(salience.viz.figure).parameters),
              salience.explore: set(inspect.signature(salience.load_model).parameters)}
    return names | handed[fn] if fn in handed else None


def test_every_keyword_of_a_documented_call_is_a_parameter():
    wrong, seen, unknown = [], 0, []
    for path in DOCS:
        for lang, body, line in blocks(path):
            if lang == "python":  # a block that does not parse would be skipped whole below
                ast.parse(body, f"{path.name}:{line}")
        pieces = [body for lang, body, _ in blocks(path) if lang == "python"]
        pieces += [text for _, text, in_block in snippets(path) if not in_block and "(" in text]
        for piece in pieces:
            try:
                tree = ast.parse(piece)
            except SyntaxError:
                continue  # prose in backticks, an elided call
            for node in ast.walk(tree):
                fn = _called(node) if isinstance(node, ast.Call) else None
                if fn is None or not callable(fn):
                    continue
                params = _keywords(fn, node)
                if params is None:
                    unknown.append(ast.unparse(node.func))
                    continue
                seen += 1
                wrong += [f"{path.name}: {ast.unparse(node.func)}(..., {k.arg}=...): no such parameter"
                          for k in node.keywords if k.arg and k.arg not in params]
    assert seen > 130 and not unknown, (seen, unknown)  # 131 calls: smoothgrad's, explore's, ... included
    assert not wrong, "\n".join(wrong)


def _only_clauses(cell: str) -> list[tuple[set[str], str]]:
    """The ``(a, b: `--flag` only)`` clauses of a "taken by" cell: (the methods named, that flag)."""
    return [(set(re.findall(r"\w+", m.group(1))) & set(salience.METHODS), m.group(2))
            for m in re.finditer(r"\(([^():]*): `(--[\w-]+)` only\)", cell)]


def test_the_cli_method_option_table_says_which_methods_take_each_flag():
    """Each row names exactly the methods that take one of its keywords (an omission is as false as an extra
    name), or "all but ..." exactly the others; "(a, b: `--upsample` only)": a and b take that one alone."""
    text = _text(ROOT / "docs/cli.md")
    table = re.search(r"^\| flag \| keyword \| taken by \| values \|\n.*?\n\n", text, re.S | re.M).group(0)
    options, wrong, rows = method_options(), [], 0
    for row in table.splitlines()[2:]:
        if not row.startswith("|"):
            continue
        flags_cell, keywords_cell, taken_cell = row.split(" | ")[:3]
        keywords = re.findall(r"`(\w+)`", keywords_cell)
        for kw in keywords:
            assert options[kw].flag in flags_cell, (row, options[kw].flag)  # the flag of that keyword
        takers = set().union(*(options[kw].defaults for kw in keywords))
        named = set(re.findall(r"\b\w+\b", taken_cell)) & set(salience.METHODS)
        if taken_cell.startswith("all"):  # "all" or "all but a, b": exactly the others take it
            every = {m for m in salience.METHODS if all(m in options[kw].defaults for kw in keywords)}
            if every != set(salience.METHODS) - named:
                wrong.append(f"{keywords}: '{taken_cell}', but taken by {sorted(every)}")
        else:
            wrong += [f"{keywords}: {m} is named but takes none of them" for m in sorted(named - takers)]
            wrong += [f"{keywords}: {m} takes it but is not named" for m in sorted(takers - named)]
        for methods, flag in _only_clauses(taken_cell):
            for m in sorted(methods):
                took = sorted(options[kw].flag for kw in keywords if m in options[kw].defaults)
                if took != [flag]:
                    wrong.append(f"{keywords}: {m}: '{flag} only' written, but it takes {took}")
        rows += 1
    assert rows >= 10, rows
    assert not wrong, "\n".join(wrong)


# ---- the Python snippets, run -------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))))


class TinyResNet(nn.Module):
    """torchvision's ResNet's names (``layer3.1.conv2``, ``layer4``) at a few channels: the snippets' ``model``."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1)
        widths = [(8, 8, 1), (8, 16, 2), (16, 24, 2), (24, 32, 2)]
        for i, (c_in, c, s) in enumerate(widths, 1):
            setattr(self, f"layer{i}", nn.Sequential(_Block(c_in, c, s), _Block(c, c)))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


DIM = r"(?:[BCHWKhw]|\d+)"
SHAPE = re.compile(rf"\({DIM}(?:, {DIM})+\)|\({DIM},\)")


def _fits(claim: str, shape: tuple[int, ...], ns: dict[str, Any]) -> bool:
    """Whether ``shape`` is the ``(B, C, H, W)``-style ``claim``: B, C, H, W those of the namespace's ``x``
    (or ``ns["dims"]``), digits as written, K any number of targets (2 or more), h, w smaller than H, W."""
    dims = dict(ns.get("dims", {}))
    x = ns.get("x")
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        dims.update(B=x.shape[0], C=x.shape[1], H=x.shape[2], W=x.shape[3])
    words = [w.strip() for w in claim.strip("()").split(",") if w.strip()]
    if len(words) != len(shape):
        return False
    for word, n in zip(words, shape):
        ok = (n == int(word) if word.isdigit() else n >= 2 if word == "K"
              else 0 < n < dims[word.upper()] if word in "hw" else n == dims[word])
        if not ok:
            return False
    return True


def _claims(stmt: ast.stmt, lines: list[str]) -> list[str]:
    """The shapes the comments of ``stmt`` (its lines and the comment lines after it) write; for an
    expression, only a comment that starts with one; ``x (B, C, H, W) -> map (B, H, W)``: the map's."""
    comment = " ".join(line.split("#", 1)[1] for line in lines[stmt.lineno - 1:stmt.end_lineno] if "#" in line)
    after = stmt.end_lineno
    while after < len(lines) and lines[after].strip().startswith("#"):
        comment += " " + lines[after].strip()[1:]
        after += 1
    comment = re.sub(r"^\s*x \(.*?\) ->", "", comment)
    if isinstance(stmt, ast.Expr) and not SHAPE.match(comment.strip()):
        return []
    return [m.group(0) for m in SHAPE.finditer(comment) if not comment[m.end():].startswith(" tensor")]  # an argument


CHECKED: list[tuple[str, str]] = []


def run_snippet(code: str, ns: dict[str, Any], skip: Optional[str] = None) -> int:
    """Run ``code`` statement by statement in ``ns`` (those matching ``skip`` left out), checking each
    assignment's (and each leading-shape expression's) written shapes; returns the number of shapes checked."""
    lines, checked = code.splitlines(), 0
    for stmt in ast.parse(code).body:
        source = ast.get_source_segment(code, stmt)
        if skip and re.search(skip, source):
            continue
        assert not re.search(r"allocator\s*=\s*['\"]reuse", source), \
            f"{source}: mallopt cannot be undone in this process; leave it out (skip=)"
        claims = _claims(stmt, lines)
        if isinstance(stmt, ast.Expr) and claims:
            values = [eval(compile(ast.Expression(stmt.value), "<doc>", "eval"), ns)]
        else:
            exec(compile(ast.Module([stmt], []), "<doc>", "exec"), ns)
            targets = stmt.targets[0] if isinstance(stmt, ast.Assign) else None
            names = ([t.id for t in targets.elts] if isinstance(targets, ast.Tuple)
                     else [targets.id] if isinstance(targets, ast.Name) else [])
            values = [ns[n] for n in names]
            claims = claims[:1] if len(names) == 1 else claims
        if not claims:
            continue
        assert len(claims) == len(values), f"{source}: {len(values)} values, comments {claims}"
        for claim, value in zip(claims, values):
            assert hasattr(value, "shape") and _fits(claim, tuple(value.shape), ns), \
                f"{source}  # {claim}, but the shape is {tuple(getattr(value, 'shape', ()))}"
            checked += 1
            CHECKED.append((source, claim))
    return checked


def python_block(doc: str, starts: str) -> str:
    """The ``python`` block of ``doc`` whose first line starts with ``starts``."""
    found = [body for lang, body, _ in blocks(ROOT / doc) if lang == "python" and body.startswith(starts)]
    assert len(found) == 1, (doc, starts, len(found))
    return found[0]


def _process_state() -> dict[str, Any]:
    """What a snippet could set for the whole process, and so for every later test of a pytest worker."""
    return {"salience.set_performance": salience.set_performance(), "torch.get_num_threads": torch.get_num_threads(),
            "torch.get_num_interop_threads": torch.get_num_interop_threads(),
            "torch.is_grad_enabled": torch.is_grad_enabled(), "torch.get_default_dtype": torch.get_default_dtype(),
            "torch.are_deterministic_algorithms_enabled": torch.are_deterministic_algorithms_enabled()}


@pytest.fixture(autouse=True)
def _leaves_the_process_as_it_was():
    """The snippets run in the tests' process: a setting one leaves (``salience.set_performance(...)``, torch's
    threads, grad mode, dtype, global RNG) is put back, and fails the test that left it."""
    before = _process_state()
    with torch.random.fork_rng(devices=[]):
        yield
    after = _process_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    put_back = {"salience.set_performance": lambda v: salience.set_performance(**vars(v)),
                "torch.get_num_threads": torch.set_num_threads, "torch.is_grad_enabled": torch.set_grad_enabled,
                "torch.get_default_dtype": torch.set_default_dtype,
                "torch.are_deterministic_algorithms_enabled": torch.use_deterministic_algorithms}
    for k in changed:  # only what changed: the rest (a deterministic mode's warn_only, ...) stays untouched
        if k in put_back:
            put_back[k](before[k])
    assert not changed, changed


def _tiny_namespace() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model": TinyResNet().eval(), "x": torch.rand(2, 3, 16, 16), "target": 3, "torch": torch,
            "my_loss": lambda out: out[:, 0].sum()}


@pytest.mark.parametrize("doc, starts, skip, shapes", [
    ("README.md", "import torch, salience", r"class_model", 4),  # 300 steps at 224 px: 20 s
    ("docs/methods-cams.md", "import salience", None, 2),
    ("docs/methods-guided-gradcam.md", "import salience", None, 4),
    ("docs/methods-guided-gradcam.md", "from salience import rules", None, 0),
    ("docs/methods-perturbation.md", "import salience", None, 6),
    ("docs/methods-smoothgrad-ig.md", "import salience", None, 8),
    ("docs/pictures.md", "import salience", None, 2),
    ("docs/performance.md", "salience.smoothgrad", r"compile=True|bf16|explain_dataset", 0),  # compiling: minutes
])
def test_method_snippets_run_and_give_the_shapes_they_say(doc, starts, skip, shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _tiny_namespace()
    ns["salience"] = salience
    assert run_snippet(python_block(doc, starts), ns, skip) == shapes  # the shapes written, each checked
    if doc == "docs/methods-guided-gradcam.md" and starts.startswith("from"):
        assert ns["x"].grad is not None and ns["x"].grad.shape == (2, 3, 16, 16)
        return
    if doc == "docs/pictures.md":
        assert all((tmp_path / f).stat().st_size > 0 for f in ("compare.png", "heat.png", "over.png", "vanilla.npy"))
        assert np.load(tmp_path / "vanilla.npy").shape == (2, 16, 16)
    if doc == "README.md":
        assert (tmp_path / "fig.png").exists()


def _images(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(name)
        names.append(str(name))
    return names


def test_the_cli_python_snippet(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    for name in ("cat.jpg", "a.jpg", "b.png"):
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(name)
    ns: dict[str, Any] = {}
    assert run_snippet(python_block("docs/cli.md", "import salience"), ns) == 2
    assert not ns["model"].training and ns["model"].salience_info is not None  # eval mode, ModelInfo attached
    batch, ok_paths, errors = ns["batch"], ns["ok_paths"], ns["errors"]
    assert batch.shape == (2, 3, 224, 224) and ok_paths == ["a.jpg", "b.png"] and not errors


def test_the_demo_data_and_zoo_snippets():
    ns: dict[str, Any] = {}
    assert run_snippet(python_block("docs/demo-models.md", "from salience import data"), ns) == 3
    assert ns["images"].dtype == torch.float32 and 0 <= ns["images"].min() and ns["images"].max() <= 1
    assert ns["labels"].dtype == torch.int64 and ns["masks"].dtype == torch.bool
    b = ns["b"]
    for field in ("images", "labels", "masks", "scale", "center", "cue_masks", "cue_labels"):  # "everything: ..."
        assert getattr(b, field).shape[0] == 100
    assert ns["data"].CLASSES == ("circle", "square", "triangle", "cross", "star")
    ns = {}
    run_snippet(python_block("docs/demo-models.md", "from salience import zoo"), ns)
    model, info = ns["model"], ns["model"].salience_info
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert (info.name, info.input_size, info.default_layer) == ("demo:shapes", (64, 64), "features.6")
    assert ns["zoo"].demo_metadata("shapes") == info.extra


def test_the_run_snippets(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    monkeypatch.chdir(tmp_path)
    paths = _images(tmp_path, 18)  # the snippets read image 17
    salience.explain_dataset("demo:shapes", paths, ["gradcam"], "runs/val", top=3, workers=0)
    (tmp_path / "RUN").symlink_to(tmp_path / "runs/val")
    readme = next(text for _, text, _ in snippets(ROOT / "README.md") if "salience.open_run" in text)
    code = re.search(r'python -c "(.*)"', readme).group(1)
    ns: dict[str, Any] = {}
    exec(code.replace("print(", "result = ("), ns)
    assert ns["result"] == (18, (64, 64))
    ns = {"dims": {"H": 64, "W": 64}, "salience": salience}
    assert run_snippet(python_block("docs/datasets.md", 'run = salience.open_run("runs/val")'), ns) == 1
    assert ns["run"].map(17, "gradcam").dtype == np.float32 and len(ns["run"]) == 18
    ns = {"dims": {"H": 64, "W": 64}}
    assert run_snippet(python_block("docs/datasets.md", "import numpy as np, pyarrow"), ns) == 1
    assert ns["m"].shape == (64, 64) and ns["m"].dtype == np.float16  # "(H, W) float16"
    if importlib.util.find_spec("starlette") and importlib.util.find_spec("uvicorn"):  # the explorer's snippet
        (tmp_path / "runs/demo").symlink_to(tmp_path / "runs/val")
        Image.open(paths[0]).save("cat.png")
        started, explore = [], salience.explore
        monkeypatch.setattr(salience, "explore", lambda *a, **k: started.append(explore(*a, **k)) or started[-1])
        ns = {"salience": salience, "model": salience.load_model("demo:shapes"),
              "other": salience.load_model("demo:shapes-regression")}
        try:
            run_snippet(python_block("docs/explore.md", "ex = salience.explore("), ns)  # its last line stops the last
        finally:  # the snippet's other lines are alternatives, each left running; the last stops its own,
            for ex in started:  # unless a line failed before it: stop() again changes nothing
                ex.stop()
        assert len(started) == 3 and all(ex.url.startswith("http://127.0.0.1:") for ex in started)
