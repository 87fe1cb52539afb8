"""Grounding of generated text to catalog items and the recommendation metrics."""

from .evaluate import Predictions, evaluate, evaluate_file, extract_title, format_table, to_json
from .metrics import METRIC_NAMES, Protocol, compute_metrics

__all__ = ["METRIC_NAMES", "Predictions", "Protocol", "compute_metrics", "evaluate", "evaluate_file",
           "extract_title", "format_table", "to_json"]
