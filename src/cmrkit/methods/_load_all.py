"""Importing this module registers every built-in method."""

from . import (  # noqa: F401
    cclip,
    coop,
    dar,
    dar_mma,
    dkr,
    ewc,
    finetune,
    l2p,
    linear_probe,
    lora_ft,
    mma,
    moder,
    modx,
    rmadapter,
    task_arithmetic,
    zeroshot,
)
