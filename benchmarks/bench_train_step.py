"""Training-step throughput: one LoRA-bank adapter vs PEFT's LoRA, same model, same targets.

A step is image + text forward, symmetric InfoNCE, backward and an AdamW step over the adapter
parameters only (r=16, alpha=32, dropout 0.1 on both sides: paper 003's settings). The bank is
timed with 1 adapter and with 4 (training the last, the others frozen, as DAR does on task 4).

    python benchmarks/bench_train_step.py --quick
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_bench_parser, model_inputs, start, table, time_cases  # noqa: E402

from cmrkit.adapters import LoRABankLinear, inject_lora_bank  # noqa: E402
from cmrkit.train.losses import clip_loss  # noqa: E402


def main() -> None:
    p = model_bench_parser(__doc__, "embedded,vitb16", "default 64 (ViT-B: 16, quick 4)")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    device = start("bench_train_step", args)
    print("medians of round-robin repeats; other jobs share this machine.\n")
    rows, verdicts = [], []
    for which in args.models.split(","):
        r, v = run_model(which.strip(), args, device)
        rows += r
        verdicts += v
    print(table(["model", "batch", "case", "steps/s", "ms/step", "x PEFT"], rows) + "\n")
    print("## target: bank training step <= 1.05x PEFT LoRA")
    print(table(["case", "measured", "verdict"], verdicts))


def run_model(which: str, args, device: torch.device):
    big = which == "vitb16"
    batch = args.batch_size or ((4 if args.quick else 16) if big else (32 if args.quick else 64))
    repeats = args.repeats or (2 if big and args.quick else 5)
    backbone, label, x_img, x_txt = model_inputs(which, batch, device)
    targets = list(backbone.lora_targets)
    models = {
        "PEFT LoRA": _peft(copy.deepcopy(backbone), targets, args.rank),
        "bank, 1 adapter": _bank(copy.deepcopy(backbone), targets, args.rank, 1),
        "bank, 4 adapters (train #4)": _bank(backbone, targets, args.rank, 4),
    }
    counts = {name: _lora_layers(m) for name, m in models.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"wrapped layer counts differ: {counts}")
    steps = {name: _stepper(m.to(device), x_img, x_txt) for name, m in models.items()}
    secs = time_cases(steps, repeats, device, warmup=1)
    ref = secs["PEFT LoRA"]
    rows = [
        [label, str(batch), name, f"{1 / s:.2f}", f"{1e3 * s:.0f}", f"{s / ref:.3f}"]
        for name, s in secs.items()
    ]
    verdicts = [
        [f"{label} b{batch}: {name}", f"{s / ref:.3f}x", "met" if s / ref <= 1.05 else "MISSED"]
        for name, s in secs.items()
        if name != "PEFT LoRA"
    ]
    print(f"{label}: {counts['PEFT LoRA']} wrapped Linear layers, batch {batch}")
    return rows, verdicts


def _bank(model: nn.Module, targets: list[str], rank: int, tasks: int) -> nn.Module:
    model.requires_grad_(False)
    bank = inject_lora_bank(model, targets)
    for _ in range(tasks):
        idx = bank.add_adapter(rank=rank, alpha=2.0 * rank, dropout=0.1)
    bank.train_adapter(idx)
    return model.train()


def _peft(model: nn.Module, targets: list[str], rank: int) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=2.0 * rank, lora_dropout=0.1, target_modules=targets)
    model = inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model.train()


def _lora_layers(model: nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, (LoRABankLinear, LoraLayer)) for m in model.modules())


def _stepper(model: nn.Module, x_img, x_txt):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.2)
    scale = model.logit_scale.exp().detach()

    def step():
        loss = clip_loss(model.encode_image(x_img), model.encode_text(x_txt), scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    main()
