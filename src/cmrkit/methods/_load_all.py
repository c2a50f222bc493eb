"""Importing this module registers every built-in method."""

from . import cclip, dar, dkr, ewc, finetune, l2p, lora_ft, modx, task_arithmetic, zeroshot  # noqa: F401
