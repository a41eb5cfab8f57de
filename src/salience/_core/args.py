"""Command-line parsing every salience command shares: flags written in full.

:class:`FullFlags` is argparse's parser without abbreviations (``allow_abbrev=False``: argparse takes ``--epo 3`` for
``--epochs 3`` otherwise, and ``--sample 3`` for ``--samples 3``), whose "unrecognized arguments" names the closest
flag (``did you mean '--epochs'?``). The ``salience`` command's parser (:class:`salience.cli.common.Parser`) and the
demo trainer (``python -m salience.demo.train``) are of this class; it lives here, below both, so that ``demo`` does
not import ``cli``.
"""
from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from salience._core.errors import suggest

__all__ = ["FullFlags"]


class FullFlags(argparse.ArgumentParser):
    """argparse's parser whose flags are written in full (no abbreviations; its subcommands' parsers are of its
    class too, argparse makes them so), and whose refusal of an unknown flag names the closest one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """argparse's, with "did you mean --layer?" after "unrecognized arguments: --layers" (the command's own
        flags; argparse names none). Only the error path does more than argparse."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}{self._did_you_mean(parsed, extra)}")
        return parsed

    def _did_you_mean(self, parsed: Any, extra: Sequence[str]) -> str:
        """``"; did you mean '--layer'?"`` for the first unknown flag of ``extra``, among the flags of the command
        that ran (the subcommand's parser) or of this parser; ``""`` when none is close."""
        parser: argparse.ArgumentParser = self
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                parser = action.choices[getattr(parsed, action.dest)]
        flags = [f[2:] for f in parser._option_string_actions if f.startswith("--")]  # compared without the "--"
        unknown = next((w.split("=", 1)[0][2:] for w in extra if w.startswith("--")), None)
        hint = suggest(unknown, flags, n=1) if unknown else ""
        return hint.replace("mean '", "mean '--")
