"""Peak memory of retrieval evaluation's ranking step vs gallery size: before and after blocking.

Each case runs in a fresh process: random L2-normalised embeddings (N images, ``--captions``
captions each, dimension ``--dim``) are made first, then the process's peak RSS is reset
(``/proc/self/clear_refs``) and the ranking step runs; "extra" = peak RSS during ranking minus
RSS before it, i.e. the memory beyond the embeddings. Both directions are ranked as
``joint_ranks`` does for one gallery (text→image against all N images, image→text against all
captions), but only for the first ``--queries`` queries of each direction: the peak is set by
one query chunk against the whole gallery and is the same for every chunk, so ranking all
queries would repeat it (and take hours at 200k on a CPU), adding only 8 bytes per query for
the ranks. "before" is the ranking code at git revision ``--before`` (``git show``), run on the
same embeddings; the ranks of both must be identical.

    flock /tmp/cmrkit-heavy.lock python benchmarks/bench_eval_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table  # noqa: E402

from cmrkit.eval.retrieval import _first_hit_ranks, _gallery_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000,20000,200000", help="gallery sizes (images)")
    p.add_argument("--captions", type=int, default=1, help="captions per image")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=2048, help="queries ranked per direction")
    p.add_argument("--before", default="96947b9", help="git revision of the old ranking code")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--case", nargs=2, metavar=("VERSION", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args)))
        return
    print(f"# bench_eval_memory\nmachine: {machine(torch.device('cpu'))}")
    print(
        f"{args.captions} caption(s) per image, dim {args.dim}, first {args.queries} queries "
        f"per direction; before = {args.before}, after = working tree\n"
    )
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        res = {v: _subprocess(v, n, args) for v in ("before", "after")}
        if res["before"]["ranks"] != res["after"]["ranks"]:
            raise SystemExit(f"N={n}: before and after give different ranks")
        emb_mb = n * (1 + args.captions) * args.dim * 4 / MB
        b, a = res["before"], res["after"]
        rows.append(
            [
                f"{n:,}",
                f"{emb_mb:.0f}",
                f"{b['extra_mb']:.0f}",
                f"{a['extra_mb']:.0f}",
                f"{b['extra_mb'] / max(a['extra_mb'], 1e-9):.1f}x",
                f"{b['seconds']:.1f}",
                f"{a['seconds']:.1f}",
                "yes",
            ]
        )
    headers = ["gallery", "embeddings MB", "before extra MB", "after extra MB", "ratio"]
    headers += ["before s", "after s", "same ranks"]
    print(table(headers, rows))


def _subprocess(version: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--case", version, str(n)]
    cmd += ["--captions", str(args.captions), "--dim", str(args.dim)]
    cmd += ["--queries", str(args.queries), "--before", args.before, "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_case(version: str, n: int, args) -> dict:
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(n, args.dim, generator=g), dim=-1)
    texts = F.normalize(
        images.repeat_interleave(args.captions, 0)
        + torch.randn(n * args.captions, args.dim, generator=g),
        dim=-1,
    )
    owner = torch.arange(n).repeat_interleave(args.captions)
    q = min(args.queries, n)
    rank = _before(args.before) if version == "before" else _after
    base = _reset_peak()
    t0 = time.perf_counter()
    t2i, i2t = rank(images, texts, owner, q)
    seconds = time.perf_counter() - t0
    extra = _peak() - base
    ranks = torch.cat([t2i, i2t])
    return {
        "extra_mb": extra / MB,
        "seconds": seconds,
        "ranks": ranks.tolist()[:64] + [int(ranks.sum())],
    }


def _after(images, texts, owner, q):
    gal_img, gal_txt = _gallery_blocks([images], 4096), _gallery_blocks([texts], 4096)
    t2i = _first_hit_ranks(texts[:q], owner[:q], gal_img, None, 1024)
    i2t = _first_hit_ranks(images[:q], torch.arange(q), gal_txt, owner, 1024)
    return t2i, i2t


def _before(rev: str):
    """The old module's ranking, called as its ``joint_ranks`` did (galleries concatenated)."""
    old = _old_module(rev)

    def rank(images, texts, owner, q):
        gal_img, gal_txt = torch.cat([images]), torch.cat([texts])
        own = torch.cat([owner])
        t2i = old._ranks_t2i(texts[:q], gal_img, owner[:q], 1024)
        i2t = old._ranks_i2t(images[:q], torch.arange(q), gal_txt, own, 1024)
        return t2i, i2t

    return rank


def _old_module(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:src/cmrkit/eval/retrieval.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = "cmrkit.eval._retrieval_before"
    module = types.ModuleType(name)
    module.__package__ = "cmrkit.eval"
    sys.modules[name] = module  # dataclasses look their module up here
    exec(compile(source, f"{rev}:retrieval.py", "exec"), module.__dict__)
    return module


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> int:
    """Reset the peak RSS (Linux: ``echo 5 > /proc/self/clear_refs``); return the RSS now."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _peak() -> int:
    return _status("VmHWM")


if __name__ == "__main__":
    main()
