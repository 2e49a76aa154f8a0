"""Moved to ``vlm_mamba.evaluation.report``; this alias is kept for one release."""

import warnings

from .evaluation.report import draw_predictions, metrics_table, metrics_text, sample_lines, write_html

__all__ = ["draw_predictions", "metrics_table", "metrics_text", "sample_lines", "write_html"]

warnings.warn("vlm_mamba.report moved to vlm_mamba.evaluation.report", DeprecationWarning, stacklevel=2)
