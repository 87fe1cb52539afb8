"""Negative sampling for DPO / S-DPO: annotate self-play candidates, choose negatives with a named
strategy, write preference datasets and explain the choice.

    from raydpo.sampling import sample_negatives, write_output
    frame, summary = sample_negatives(dataset, candidates, "clusterout_low", seed=0)
    write_output(frame, summary, "negatives/clusterout_low.parquet")

Strategies (``strategy_names()``; rules and fallbacks in each docstring, ``describe_strategies()``):
the 9 cluster/exposure strategies of the published work, ``selfplay``, ``top_n``, ``random`` and
the 12 LightGCN distance strategies. Add your own with ``@register_strategy("name")``.
"""

from .annotate import AnnotationConfig, Annotated, annotate, read_candidates_table
from .context import BatchContext, SampleContext, SamplingState
from .lightgcn import LightGCN, LightGCNConfig
from .run import (format_summary, prepare, sample_negatives, sample_negatives_ray, sample_to_file, select_table,
                  summary_path, write_output)
from .strategies import (CLUSTER_EXPOSURE_STRATEGIES, LIGHTGCN_STRATEGIES, BatchSelection, Selection, Strategy,
                         apply_strategy, describe_strategies, get_strategy, load_plugin, register_strategy,
                         strategy_names, unregister_strategy)

__all__ = [
    "AnnotationConfig", "Annotated", "annotate", "read_candidates_table",
    "BatchContext", "SampleContext", "SamplingState",
    "LightGCN", "LightGCNConfig",
    "format_summary", "prepare", "sample_negatives", "sample_negatives_ray", "sample_to_file", "select_table",
    "summary_path", "write_output",
    "CLUSTER_EXPOSURE_STRATEGIES", "LIGHTGCN_STRATEGIES", "BatchSelection", "Selection", "Strategy",
    "apply_strategy", "describe_strategies", "get_strategy", "load_plugin", "register_strategy", "strategy_names",
    "unregister_strategy",
]
