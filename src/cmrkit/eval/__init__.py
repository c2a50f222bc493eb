"""Evaluation: retrieval Recall@K, zero-shot classification, continual metrics, reports."""

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
from cmrkit.eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings, zeroshot_classify

__all__ = [
    "DEFAULT_TEMPLATES",
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
