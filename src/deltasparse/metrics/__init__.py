"""Sparsity measurement: hooks, exact MAC counting and the ``SparsityReport``."""

from .measure import measure, record_outputs
from .report import LayerReport, SparsityReport

__all__ = ["LayerReport", "SparsityReport", "measure", "record_outputs"]
