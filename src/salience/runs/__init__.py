"""Dataset runs: a whole folder, list or ``Dataset`` explained into a resumable store.

:func:`explain_dataset` (:mod:`salience.runs.dataset`) computes; :func:`open_run`
(:mod:`salience.runs.store`) reads a run back lazily; :mod:`salience.runs.gallery` writes its
``index.html``; :mod:`salience.runs.ray_engine` runs the same job on a Ray cluster (the one salience
starts is kept for the process's later runs: :func:`shutdown_ray` ends it sooner than the exit).
See docs/datasets.md for the store's layout.
"""
from __future__ import annotations

from salience.runs.dataset import explain_dataset
from salience.runs.ray_engine import shutdown_ray
from salience.runs.store import Run, open_run

__all__ = ["explain_dataset", "open_run", "Run", "shutdown_ray"]
