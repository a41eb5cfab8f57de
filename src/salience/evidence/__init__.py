"""Evidence about saliency maps: can a map be trusted? Metrics by family and the evaluation run."""
from __future__ import annotations

from salience.evidence.metrics import *  # noqa: F401,F403
from salience.evidence.metrics import __all__ as _metrics_all

__all__ = list(_metrics_all)
