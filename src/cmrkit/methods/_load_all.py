"""Importing this module registers every built-in method."""

from . import finetune, zeroshot  # noqa: F401
