"""Shared pieces of the benchmarks: machine description, models, adapter banks, routes, timing.

Cases are timed round-robin (repeat r runs every case once before repeat r+1) and summarised by
their median, so slow drifts in machine load hit all cases alike and ratios stay comparable.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from cmrkit.adapters import AdapterRouting, LoRABank, inject_lora_bank
from cmrkit.merging import merge_in_core


def dar_merge_rule() -> tuple[str, dict]:
    """DAR's default core-space merge rule and parameters (read from the method itself)."""
    import inspect

    from cmrkit.methods.dar import DAR

    sig = inspect.signature(DAR.__init__).parameters
    return sig["merge_rule"].default, dict(sig["merge_params"].default or {})


# --- machine ----------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (
        f"{platform.node()} | {cpu} | {os.cpu_count()} cores | load avg {load} | "
        f"device {dev} | torch {torch.__version__} | threads {torch.get_num_threads()}"
    )


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- a model benchmark's command line and start ---------------------------------------------------
def model_bench_parser(doc: str, models: str, batch_help: str, repeats_help: str | None = None):
    """The options of a model benchmark: --models, --quick, --batch-size, --repeats, --threads,
    --device (the script adds its own)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--models", default=models, help="embedded and/or vitb16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch-size", type=int, default=None, help=batch_help)
    p.add_argument("--repeats", type=int, default=None, help=repeats_help)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None)
    return p


def start(name: str, args: argparse.Namespace) -> torch.device:
    """Torch threads and the device from ``args``; prints the report's title and machine line."""
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"# {name}\nmachine: {machine(device)}; clock: {clock_name(device)}")
    return device


def model_inputs(which: str, batch: int, device: torch.device):
    """``(backbone, label, pixels, tokens)``: the model in eval mode on ``device`` and one batch
    of images and captions for it."""
    backbone, label = load_model(which)
    backbone = backbone.to(device).eval()
    return backbone, label, images(backbone, batch, device), texts(backbone, batch, device)


# --- models -----------------------------------------------------------------------------------
def embedded_backbone():
    """cmrkit-mini; with its image weights missing, the same architecture with a random image
    tower (speed and memory do not depend on the values); tiny-mini if MiniLM is missing too."""
    from cmrkit.backbones.embedded import VISION_WEIGHTS, load_mini

    try:
        if VISION_WEIGHTS.exists():
            return load_mini(), "cmrkit-mini"
        return load_mini(random_vision=True), "cmrkit-mini architecture (random image tower)"
    except ModuleNotFoundError:
        from cmrkit.backbones import load_backbone

        return load_backbone("tiny-mini"), "tiny-mini (cmrkit-mini unavailable)"


def vit_b16_clip():
    """A randomly initialised CLIP with ViT-B/16 sizes (image 224 px, patch 16, 768 x 12 layers;
    text 512 x 12 layers), MiniLM's WordPiece tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from cmrkit.backbones.embedded import minilm_tokenizer
    from cmrkit.backbones.hf import HFDualEncoder

    tok = minilm_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=tok.vocab_size,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            max_position_embeddings=77,
            eos_token_id=tok.sep_token_id,
            bos_token_id=None,
        ),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        ),
        projection_dim=512,
    )
    torch.manual_seed(0)
    return HFDualEncoder(
        CLIPModel(cfg).eval(), tok, name="vit-b16-random"
    ), "ViT-B/16 CLIP (random)"


def load_model(which: str):
    from cmrkit.utils import quiet_transformers

    quiet_transformers()
    return embedded_backbone() if which == "embedded" else vit_b16_clip()


def add_bank(
    backbone, tasks: int, rank: int, alpha: float | None = None, seed: int = 0
) -> LoRABank:
    """Inject a bank of ``tasks`` adapters with non-zero B (as if trained)."""
    bank = inject_lora_bank(backbone, backbone.lora_targets)
    g = torch.Generator().manual_seed(seed)
    for _ in range(tasks):
        idx = bank.add_adapter(rank=rank, alpha=alpha or 2.0 * rank, dropout=0.0)
        with torch.no_grad():
            for layer in bank.layers.values():
                b = layer.lora_B[idx]
                b.copy_(0.02 * torch.randn(b.shape, generator=g, dtype=b.dtype))
    return bank


# --- inputs and routes ------------------------------------------------------------------------
CAPTION = "a small brown dog runs across a green field next to a wooden fence on a sunny day"


def images(backbone, batch: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(batch)
    size = backbone.image_size
    return torch.randn(batch, 3, size, size, generator=g).to(device)


def texts(backbone, batch: int, device: torch.device) -> dict[str, Tensor]:
    tokens = backbone.tokenize([CAPTION] * batch)
    return {k: v.to(device) for k, v in tokens.items()}


def random_routes(batch: int, tasks: int, k: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Per-sample distinct top-k adapters and softmax weights: the mixed (worst) case, where a
    batch holds every adapter set."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(tasks, generator=g)[:k] for _ in range(batch)])
    weights = torch.softmax(torch.randn(batch, k, generator=g), dim=1)
    return idx, weights


def routing_cases(batch: int, tasks: int) -> dict[str, AdapterRouting | None]:
    """The routings compared (None = bare backbone), built as DAR builds them (Route ->
    AdapterRouting): its default rule, TIES, and task arithmetic (a linear rule: the cost of the
    core-space machinery alone)."""
    from cmrkit.routing import Route

    idx, w = random_routes(batch, tasks)
    rule, params = dar_merge_rule()
    route = Route(idx, w)
    # The same routes with the batch sorted by adapter set (as the gallery index feeds DAR):
    # every set is then a contiguous slice, handled on views.
    pairs = idx.sort(dim=1).values
    order = sorted(range(batch), key=lambda i: pairs[i].tolist())
    sorted_route = Route(idx[order], w[order])
    return {
        "bare backbone": None,
        "one LoRA (unmerged)": AdapterRouting.single(0),
        "DAR hard routing": Route(idx[:, :1], torch.ones(batch, 1)).to_routing(rule),
        f"DAR top-2 core merge ({rule})": route.to_routing(rule, **params),
        f"DAR top-2 core merge ({rule}, sorted)": sorted_route.to_routing(rule, **params),
        "DAR top-2 core merge (ties)": route.to_routing("ties", density=0.5),
        "DAR top-2 core merge (TA)": route.to_routing("task_arithmetic"),
    }


# --- naive reference: materialised merged weights, one sample at a time ----------------------
@torch.no_grad()
def naive_per_sample(bank: LoRABank, run: Callable[[int], Tensor], routing: AdapterRouting) -> None:
    """For each sample, W_i = W + U merge(M) V in every layer, then a batch-1 forward."""
    layers = list(bank.layers.values())
    originals = [layer.base.weight.clone() for layer in layers]
    rule, params = routing.rule, dict(routing.params)
    try:
        with bank.disabled():
            for i in range(routing.indices.shape[0]):
                order = routing.indices[i].argsort()
                members = tuple(routing.indices[i][order].tolist())
                weights = routing.weights[i][order]
                for layer, w0 in zip(layers, originals):
                    basis = layer._basis(members)  # cached: only the per-sample work is timed
                    delta = basis.to_full(merge_in_core(basis, weights, rule, **params))
                    torch.add(w0, delta.to(w0.dtype), out=layer.base.weight)  # one pass
                run(i)
    finally:
        for layer, w0 in zip(layers, originals):
            layer.base.weight.copy_(w0)


# --- timing -----------------------------------------------------------------------------------
def clock_name(device: torch.device) -> str:
    return "wall-clock" if device.type == "cuda" else "process CPU"


def time_cases(
    cases: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per case, cases interleaved round-robin.

    On CPU the clock is the process's CPU time: with torch on a fixed number of threads it is
    the work done, and time the scheduler gives to other jobs on a shared machine does not
    count (wall time there swings by tens of percent). CUDA uses synchronised wall time.
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def routed(bank: LoRABank, routing: AdapterRouting | None):
    return bank.disabled() if routing is None else bank.routing(routing)


def prime_core_bases(bank: LoRABank, tasks: int, k: int = 2) -> None:
    """Build every layer's core basis for every k-subset once (DAR's steady state: bases are
    cached per adapter set and rebuilt only when an adapter changes)."""
    from itertools import combinations

    for layer in bank.layers.values():
        for members in combinations(range(tasks), k):
            layer._basis(members)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *map(line, rows)])
