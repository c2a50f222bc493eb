"""cmrkit: continual multimodal retrieval (DAR, baselines, evaluation, gallery index)."""

__version__ = "0.1.0"
