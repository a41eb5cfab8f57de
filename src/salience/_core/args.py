"""Command-line parsing every salience command shares: flags written in full.

:class:`FullFlags` is argparse's parser without abbreviations (``allow_abbrev=False``: argparse takes ``--epo 3`` for
``--epochs 3`` otherwise, and ``--sample 3`` for ``--samples 3``), whose "unrecognized arguments" names the closest
flag (``did you mean '--epochs'?``; each flag an abbreviation could stand for: ``did you mean '--epochs' or
'--epsilon'?``), and whose flag's value that starts with ``-`` and a digit (``--lr -1e-3``, ``--max-memory -5GB``) is
that value (:meth:`FullFlags.negative_values`), not argparse's "expected one argument". The ``salience`` command's parser (:class:`salience.cli.common.Parser`) and the
demo trainer (``python -m salience.demo.train``) are of this class; it lives here, below both, so that ``demo`` does
not import ``cli``.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Optional, Sequence

from salience._core.errors import suggest

__all__ = ["FullFlags"]


class FullFlags(argparse.ArgumentParser):
    """argparse's parser whose flags are written in full (no abbreviations; its subcommands' parsers are of its
    class too, argparse makes them so), and whose refusal of an unknown flag names the closest one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Any:
        """argparse's, of :meth:`negative_values` of the words."""
        words = sys.argv[1:] if args is None else args
        return super().parse_known_args(self.negative_values(words), namespace)

    def negative_values(self, words: Sequence[str]) -> list[str]:
        """``words`` with ``FLAG -5GB`` as ``FLAG=-5GB`` where ``FLAG`` is one of this parser's flags that take one
        value and the next word starts with ``-`` and a digit or a point but is no number argparse reads as one
        (``-5``, ``-0.5`` are; ``-1e-3`` is not): the value reaches the flag's own check, which says what is wrong
        with it. Nothing after ``--`` is touched."""
        out: list[str] = []
        i = 0
        while i < len(words):
            w = words[i]
            if w == "--":
                return out + list(words[i:])
            action = self._option_string_actions.get(w)
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if (action is not None and action.nargs is None and action.option_strings and
                    not isinstance(action, (argparse._StoreConstAction, argparse._CountAction)) and
                    re.match(r"-\.?\d", nxt) and not re.fullmatch(r"-\d+|-\d*\.\d+", nxt)):
                out.append(f"{w}={nxt}")
                i += 2
                continue
            out.append(w)
            i += 1
        return out

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """argparse's, with "did you mean --layer?" after "unrecognized arguments: --layers" (the command's own
        flags; argparse names none). Only the error path does more than argparse."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}{self._did_you_mean(parsed, extra)}")
        return parsed

    def _did_you_mean(self, parsed: Any, extra: Sequence[str]) -> str:
        """``"; did you mean '--layer'?"`` for the first unknown flag of ``extra``, among the flags of the command
        that ran (the subcommand's parser) or of this parser: the flags it is an abbreviation of (all of them, up to
        3: ``--ep`` names ``--epochs`` and ``--epsilon``), else the closest by spelling; ``""`` when none is close."""
        parser: argparse.ArgumentParser = self
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                parser = action.choices[getattr(parsed, action.dest)]
        flags = [f[2:] for f in parser._option_string_actions if f.startswith("--")]  # compared without the "--"
        unknown = next((w.split("=", 1)[0][2:] for w in extra if w.startswith("--")), None)
        if not unknown:
            return ""
        starts = sorted(f for f in flags if f.startswith(unknown))[:3]
        if starts:
            return "; did you mean " + " or ".join(f"'--{f}'" for f in starts) + "?"
        return suggest(unknown, flags, n=1).replace("mean '", "mean '--")
