"""``cmrkit vlm pretrain|bench``: the mini VLM and the continual expert-routing benchmark."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("vlm", help="mini vision-language model: pretrain it, run expert routing")
    vsub = p.add_subparsers(
        dest="vlm_command", required=True, metavar="VLM_COMMAND", help="pretrain or bench"
    )
    pre = vsub.add_parser("pretrain", help="pretrain the mini VLM on the general instruction mix")
    pre.add_argument("--out", help="weights file (default: the shipped asset)")
    pre.add_argument("--data-root", help="data root (default: $CMRKIT_DATA, else ../shared/data)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the data and the model")
    pre.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    pre.add_argument("--batch-size", type=int, default=64, help="examples per step")
    pre.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    pre.add_argument("--general-scenes", type=int, default=4000, help="generated training scenes")
    pre.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(run=_pretrain)

    b = vsub.add_parser("bench", help="continual specialised tasks: experts, routing, baselines")
    b.add_argument("--methods", default="all", help="comma-separated method names, or all")
    b.add_argument("--out", required=True, help="output folder (results.json, report.md)")
    b.add_argument("--model", help="mini VLM weights (default: the shipped asset)")
    b.add_argument("--data-root", help="data root (default: $CMRKIT_DATA, else ../shared/data)")
    b.add_argument("--tasks", help="comma-separated task order (default: count,spatial,glyph,xray)")
    b.add_argument("--seed", type=int, default=0, help="data and training seed")
    b.add_argument("--steps", type=int, help="expert training steps per task")
    b.add_argument("--gate-steps", type=int, help="gate training steps per task (PHATGOOSE: 100)")
    b.add_argument("--lr", type=float, help="expert learning rate")
    b.add_argument("--batch-size", type=int, help="training batch size")
    b.add_argument("--rank", type=int, help="LoRA rank of each expert (paper: 16)")
    b.add_argument("--task-train", type=int, help="training examples per task")
    b.add_argument("--task-test", type=int, help="test examples per task")
    b.add_argument("--general-test", type=int, help="general benchmark items per question kind")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    b.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    b.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method's option, e.g. phatgoose.top_k=1, phatgoose.base_threshold=0.5, "
        "merge.lam=0.5, arrow.temperature=2",
    )
    b.set_defaults(run=_bench)


def _pretrain(args) -> int:
    from .mini import PretrainVLMConfig, pretrain_vlm

    for name in ("steps", "batch_size", "general_scenes", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
    report = pretrain_vlm(
        PretrainVLMConfig(
            out=args.out,
            data_root=args.data_root,
            seed=args.seed,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            general_scenes=args.general_scenes,
            threads=args.threads,
            progress=not args.no_progress,
        )
    )
    print(json.dumps(report, indent=1))
    return 0


def _bench(args) -> int:
    from .bench import VLMBenchConfig, run_vlm_bench

    cfg = VLMBenchConfig.from_args(args)
    results = run_vlm_bench(cfg)
    out = Path(cfg.out)
    print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    for name, record in results["methods"].items():
        print(f"{name}: " + "  ".join(f"{k} {v:.1f}" for k, v in record["summary"].items()))
    return 0
