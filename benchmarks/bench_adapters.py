"""RMAdapter vs MMA vs LoRA: training-step time and memory, and inference cost vs the frozen model.

Training step = what each method's loss needs (``method.training_loss``: image and text forwards,
RMAdapter's frozen forwards for its consistency term) + backward + an AdamW step over the
trainable parameters. MMA / RMAdapter read ``batch`` class prompts per step (one per class, as
few-shot classification does, here as many classes as images), LoRA (``lora_ft``) ``batch``
captions, so every case encodes ``batch`` images and ``batch`` texts. Memory = peak bytes of
tensors created during the step (activations, gradients, temporaries; PeakTracker on CPU, CUDA's
peak allocator statistics on GPU). Inference = one image + one text batch forward in eval mode,
no grad; the ratio is to the frozen backbone. RMAdapter's decoder never runs at inference, so its
inference row should match MMA's.

    python benchmarks/bench_adapters.py --quick
"""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import model_bench_parser, model_inputs, start, table, time_cases  # noqa: E402
from bench_memory import MB, PeakTracker  # noqa: E402

from cmrkit.methods import TaskContext, build_method  # noqa: E402
from cmrkit.train.loop import TrainConfig  # noqa: E402

METHODS = ("lora_ft", "mma", "rmadapter_norec", "rmadapter")


def main() -> None:
    p = model_bench_parser(__doc__, "embedded", "default 32 (quick 8)", "default 7 (quick 3)")
    args = p.parse_args()
    device = start("bench_adapters", args)
    batch = args.batch_size or (8 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 7)
    print(f"batch {batch} images + {batch} texts; medians of {repeats} round-robin repeats.\n")
    for which in args.models.split(","):
        run_model(which.strip(), batch, repeats, device)


def _method(backbone, name: str, batch: int, device):
    method = build_method(name, copy.deepcopy(backbone).to(device))
    classes = [f"class number {i}" for i in range(batch)]
    method.begin_task(TaskContext(0, "bench", None, TrainConfig(), ["bench"], classes, ["a {}."]))
    return method, classes


def run_model(which: str, batch: int, repeats: int, device: torch.device) -> None:
    backbone, label, pixels, tokens = model_inputs(which, batch, device)
    methods = {name: _method(backbone, name, batch, device) for name in METHODS}
    optims = {
        n: torch.optim.AdamW(list(m.trainable_parameters()), lr=1e-4)
        for n, (m, _) in methods.items()
    }

    def step(name: str):
        method, classes = methods[name]
        method.train_mode(True)
        extra = (classes,) if method.reads_captions else ()
        loss = sum(method.training_loss(pixels, tokens, *extra).values())
        optims[name].zero_grad(set_to_none=True)
        loss.backward()
        optims[name].step()

    train_s = time_cases({n: (lambda n=n: step(n)) for n in METHODS}, repeats, device)
    train_mb = {n: _peak_mb(lambda n=n: step(n), device) for n in METHODS}
    rows = []
    for n in METHODS:
        params = sum(p.numel() for p in methods[n][0].trainable_parameters())
        rows.append(
            [
                n,
                f"{params / 1e3:.1f}k",
                f"{1e3 * train_s[n]:.1f}",
                f"{train_s[n] / train_s['mma']:.2f}",
                f"{train_s[n] / train_s['lora_ft']:.2f}",
                f"{train_mb[n]:.1f}",
                f"{train_mb[n] / train_mb['mma']:.2f}",
            ]
        )
    print(f"## {label}: training step")
    headers = ["method", "trainable", "ms/step", "x MMA", "x LoRA", "peak MB", "mem x MMA"]
    print(table(headers, rows) + "\n")

    def infer(encoder):
        with torch.inference_mode():
            encoder.encode_image(pixels)
            encoder.encode_text(tokens)

    frozen = copy.deepcopy(backbone)
    cases = {"frozen": lambda: infer(frozen)}
    for n in METHODS:
        methods[n][0].train_mode(False)
        cases[n] = lambda n=n: infer(methods[n][0].encoder())
    infer_s = time_cases(cases, repeats, device)
    infer_mb = {n: _peak_mb(fn, device) for n, fn in cases.items()}
    rows = [
        [
            n,
            f"{1e3 * infer_s[n]:.1f}",
            f"{infer_s[n] / infer_s['frozen']:.3f}",
            f"{infer_mb[n]:.1f}",
            f"{infer_mb[n] / infer_mb['frozen']:.3f}",
        ]
        for n in cases
    ]
    print(f"## {label}: inference (image + text batch, eval, no grad)")
    print(table(["model", "ms", "x frozen", "peak MB", "mem x frozen"], rows) + "\n")


def _peak_mb(fn, device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MB
    with PeakTracker() as tracker:
        fn()
    return tracker.peak / MB


if __name__ == "__main__":
    main()
