"""Session 55: two sides of a comparison, each a worker process importing salience from its own ``src`` tree.

A benchmark that times this checkout against another git revision loads that revision's whole ``salience``
package, not one module of it: ``git archive REF src | tar -x -C TMP`` (:func:`archive_src`) and a worker process
with ``TMP/src`` first on its path (:class:`Side`). That works for a revision before ``_core/guard.py`` became the
package ``_core/guard/`` (session 54) and after it; the two sides never share a module table.

A worker is the benchmark script itself run with ``--worker SRC``: it answers one JSON request a line on stdin with
one JSON answer a line on stdout (:func:`serve`). The parent asks one side at a time, so only one process runs at
once, and alternates the order by round. Not part of salience and not run by the tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def archive_src(ref: str) -> str:
    """The ``src`` folder of git revision ``ref`` (a commit, a branch) unpacked in a fresh temporary folder: its
    path. A path to a folder holding ``salience`` is returned as it is (an archive made before)."""
    if (Path(ref) / "salience").is_dir():
        return str(Path(ref).resolve())
    root = tempfile.mkdtemp(prefix="salience-side-")
    archive = subprocess.run(["git", "archive", ref, "src"], cwd=HERE.parent, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    return str(Path(root) / "src")


def commit_of(ref: str) -> str:
    """The commit ``ref`` names (short), or ``ref`` where it is a folder or git does not know it."""
    got = subprocess.run(["git", "rev-parse", "--short", ref], cwd=HERE.parent, capture_output=True, text=True)
    return got.stdout.strip() if got.returncode == 0 else ref


class Side:
    """A worker process: ``script --worker SRC`` with ``SRC`` first on ``PYTHONPATH`` (and on ``sys.path`` inside,
    :func:`serve`), on the parent's CPUs (``taskset`` carries over)."""

    def __init__(self, script: str, src: str, label: str) -> None:
        self.src, self.label = src, label
        env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
        self.p = subprocess.Popen([sys.executable, script, "--worker", src], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=str(HERE.parent))

    def ask(self, **req) -> dict:
        """Send ``req``, return the answer; a worker's error is raised here with its traceback."""
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker ({self.src}) died on {req}")
        got = json.loads(line)
        if "error" in got:
            raise RuntimeError(f"the {self.label} worker ({self.src}) failed on {req}:\n{got['error']}")
        return got

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(timeout=60)


def serve(src: str, handlers: dict[str, Callable[..., dict]]) -> None:
    """The worker's loop: ``{"cmd": NAME, ...}`` answered by ``handlers[NAME](**rest)``; an exception is answered
    as ``{"error": traceback}``. Called with ``src`` already first on ``sys.path`` (see :func:`import_from`)."""
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        try:
            out = handlers[cmd](**req)
        except Exception:
            out = {"error": traceback.format_exc()}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def import_from(src: str) -> None:
    """Put ``src`` first on ``sys.path`` and check that ``salience`` is imported from it (not an installed copy)."""
    sys.path.insert(0, src)
    import salience

    got = Path(salience.__file__).resolve()
    if not str(got).startswith(str(Path(src).resolve())):
        raise RuntimeError(f"salience imported from {got}, not from {src}")


def round_order(sides: list, r: int) -> list:
    """The order of the sides in round ``r``: rotated by one each round (AB, BA, ... for two)."""
    s = r % len(sides)
    return sides[s:] + sides[:s]
