"""Evaluation: retrieval Recall@K, zero-shot classification, continual metrics, bootstrap
intervals, the results schema, reports."""

from cmrkit.eval.bootstrap import BootstrapConfig, paired_difference, recall_interval
from cmrkit.eval.metrics import (
    average_incremental,
    backward_transfer,
    final_average,
    forgetting,
    summarize,
)
from cmrkit.eval.report import render_markdown, write_plots, write_report
from cmrkit.eval.retrieval import (
    DatasetEmbeddings,
    embed_dataset,
    embed_images,
    embed_texts,
    evaluate_retrieval,
    flatten_captions,
    joint_recall,
    recall_at_k,
)
from cmrkit.eval.schema import Results, load_results, save_results, validate_results
from cmrkit.eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings, zeroshot_classify

__all__ = [
    "DEFAULT_TEMPLATES",
    "BootstrapConfig",
    "Results",
    "load_results",
    "paired_difference",
    "recall_interval",
    "save_results",
    "validate_results",
    "DatasetEmbeddings",
    "average_incremental",
    "backward_transfer",
    "class_embeddings",
    "embed_dataset",
    "embed_images",
    "embed_texts",
    "evaluate_retrieval",
    "final_average",
    "flatten_captions",
    "forgetting",
    "joint_recall",
    "recall_at_k",
    "render_markdown",
    "summarize",
    "write_plots",
    "write_report",
    "zeroshot_classify",
]
