"""Importing this module registers every built-in method."""

from . import (  # noqa: F401
    cclip,
    dar,
    dkr,
    ewc,
    finetune,
    l2p,
    lora_ft,
    moder,
    modx,
    task_arithmetic,
    zeroshot,
)
