"""The cmrkit command."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

QUICK = {"epochs": 1, "batch_size": 64, "warmup_epochs": 0}
QUICK_TEMPLATES = ["a photo of a {}."]
DESCRIPTION = (
    "Continual multimodal retrieval: benchmark runs of continual methods (bench, ablate), the "
    "embedded backbone (pretrain, eval), data checks, adapter banks, a gallery index. "
    "Run 'cmrkit COMMAND --help' for a command's options."
)
# Modules of the optional extras, by the extra that installs them (pip install 'cmrkit[EXTRA]').
OPTIONAL_EXTRAS = {
    "peft": "peft",
    "datasets": "hub",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "httpx": "serve",
}
PRETRAIN_HELP = {
    "out": "where to write the image tower (default: the shipped weights file)",
    "steps": "optimizer steps",
    "batch_size": "image-caption pairs per step (per process under torchrun)",
    "lr": "peak learning rate (AdamW, cosine after warm-up)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps",
    "synthetic_per_style": "generated scenes per rendering style added to cmr-base",
    "base_items_per_source": "cap on cmr-base items per source (default: all; a cap is for tests)",
    "caption_tokens": "captions are truncated to this many tokens when embedded",
    "seed": "random seed (the build is bit for bit reproducible for a seed and thread count)",
    "threads": "torch threads (part of what makes the build reproducible)",
    "crop_pad": "images are stored this many pixels larger and randomly cropped",
    "cls_domains": "build cmrkit-mini-cls: add cmr-cls's pretraining half of icon themes and "
    "fonts (configs/domains/cmr-cls.yaml); written to cmrkit-mini-cls-vision.safetensors",
    "cls_weight": "with --cls-domains: draw a domain's images this many times as often, "
    "e.g. icons=4 or icons=4,glyphs=2 (default: every image alike)",
}


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = _Parser(prog="cmrkit", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cmrkit {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of the commands below"
    )
    _bench_parser(sub)
    _pretrain_parser(sub)
    _eval_parser(sub)
    _data_parser(sub)
    for register in _extra_commands():
        register(sub)
    args = parser.parse_args(argv)
    from . import distributed
    from .utils import quiet_transformers

    quiet_transformers()
    distributed.init_from_env()  # under torchrun: join its process group (nccl or gloo)
    try:
        return args.run(args) or 0
    except (OSError, ValueError) as e:  # FileNotFoundError, PermissionError, DataError, ...
        print(f"cmrkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if not e.name or e.name.partition(".")[0] == "cmrkit":
            raise  # a broken installation, not a user's choice of feature
        print(f"cmrkit {args.command}: error: {_missing_package(e.name)}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


def _missing_package(module: str) -> str:
    top = module.partition(".")[0]
    extra = OPTIONAL_EXTRAS.get(top)
    how = f"pip install 'cmrkit[{extra}]'" if extra else f"pip install {top}"
    return f"this needs the optional package {top!r}, which is not installed ({how})"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _whole_number(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _extra_commands():
    """Sub-commands that live with their part of the package (adapters, index, serve)."""
    registers = []
    for module in (
        "cmrkit.adapters.cli",
        "cmrkit.ablate",
        "cmrkit.classify",
        "cmrkit.index.cli",
        "cmrkit.serve.cli",
        "cmrkit.vlm.cli",
    ):
        try:
            registers.append(__import__(module, fromlist=["register"]).register)
        except ModuleNotFoundError:
            continue
    return registers


def _common_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="cmr-mini", help="suite name or path of a suite YAML")
    p.add_argument("--data-root", help="data root (default: $CMRKIT_DATA, else ../shared/data)")
    p.add_argument(
        "--backbone",
        default="cmrkit-mini",
        help="cmrkit-mini | hf:NAME_OR_PATH | open_clip:ARCH[:TAG] | tiny-*",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip missing/unreadable images and malformed rows (recorded with file and row)",
    )
    p.add_argument(
        "--allow-outside-files",
        action="store_true",
        help="accept file_name entries that leave their split folder (../, absolute, symlinks)",
    )
    p.add_argument("--holdout", default="", help="comma-separated tasks to use as held-out probes")
    p.add_argument(
        "--eval-batch-size",
        type=_whole_number(1),
        default=512,
        help="images or captions per evaluation batch",
    )
    p.add_argument(
        "--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cpu)"
    )


# --- bench ------------------------------------------------------------------------------------
def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run continual methods over a suite")
    _common_data_args(p)
    p.add_argument(
        "--methods", default="zeroshot,finetune", help="comma-separated method names, or 'all'"
    )
    run_args(p)
    p.add_argument(
        "--order",
        choices=["zs", "reverse", "given"],
        default=None,
        help="task order: zero-shot curriculum, its reverse, or as given in the suite",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="quick settings: 1 epoch, batch 64, one prompt template",
    )
    p.add_argument(
        "--seeds",
        help="comma-separated training seeds (0,1,2): the whole run is repeated per seed in "
        "OUT/seed-N and OUT holds mean ± sd over seeds, per-seed values kept",
    )
    p.add_argument(
        "--preset",
        help="named settings (configs/presets/NAME.yaml, e.g. reference): epochs and learning "
        "rate per method family; --epochs, --lr, --set ... still override them",
    )
    p.add_argument(
        "--validation",
        type=float,
        help="choose settings: evaluate on this seeded fraction of each task's training split "
        "(e.g. 0.2) and train on the rest; the test splits are not read",
    )
    p.set_defaults(run=_run_bench)


def run_args(p: argparse.ArgumentParser) -> None:
    """The arguments of a run that ``bench`` and ``classify`` share: output, resume, training
    settings for every method, one method's ``--set``, progress bars (read by
    :func:`train_overrides` and :func:`_method_options`)."""
    p.add_argument("--out", required=True, help="output folder (results.json, report.md, plots)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    p.add_argument("--epochs", type=float, help="epochs per task, for every method")
    p.add_argument("--batch-size", type=int, help="training batch size, for every method")
    p.add_argument("--lr", type=float, help="learning rate, for every method")
    p.add_argument("--grad-accum", type=int, help="batches accumulated per optimizer step")
    p.add_argument("--max-steps", type=int, help="cap optimizer steps per task (smoke runs)")
    p.add_argument("--max-train-items", type=int, help="cap training items per task")
    p.add_argument("--seed", type=int, help="training seed (every task is seeded from it)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override one method's option or training setting, e.g. dar.rank=8, finetune.lr=5e-5 "
        "(repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--cache-mb",
        type=int,
        default=1024,
        help="bound of each shared cache: evaluation images, embeddings of unchanged models "
        "(MiB; 0: none; numbers do not change)",
    )


def train_overrides(args, base: dict | None = None) -> dict:
    """``base`` updated with the training settings given on the command line (see run_args)."""
    from .train.loop import TrainConfig

    overrides = dict(base or {})
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            overrides[f.name] = value
    if args.no_progress:
        overrides["progress"] = False
    return overrides


def _run_bench(args) -> int:
    from . import distributed
    from .bench import BenchConfig, run_bench, run_seeds
    from .methods import METHODS, _load_all  # noqa: F401  (fills the registry)

    every = sorted(m for m, cls in METHODS.items() if cls.retrieval)
    methods = every if args.methods == "all" else _split(args.methods)
    # with a preset, --quick keeps only its one prompt template: the preset sets the schedule
    overrides = train_overrides(args, QUICK if args.quick and not args.preset else None)
    cfg = BenchConfig(
        suite=args.suite,
        methods=methods,
        out=args.out,
        data_root=args.data_root,
        backbone=args.backbone,
        order=args.order,
        holdout=_split(args.holdout),
        train_overrides=overrides,
        method_options=_method_options(args.set),
        eval_batch_size=args.eval_batch_size,
        max_train_items=args.max_train_items,
        resume=args.resume,
        skip_bad=args.skip_bad,
        allow_outside=args.allow_outside_files,
        preset=args.preset,
        validation=args.validation,
        cache_mb=args.cache_mb,
    )
    if args.quick:
        cfg.templates = list(QUICK_TEMPLATES)
    if args.device:
        cfg.device = args.device
    seeds = _seeds(args.seeds)
    if seeds and args.seed is not None:
        raise ValueError("--seed and --seeds: give one of them")
    results = run_seeds(cfg, seeds) if seeds else run_bench(cfg)
    failed = [r["failed"] for r in results["methods"].values() if r.get("failed")]
    if distributed.is_main():  # under torchrun every rank holds the results; one reports them
        _print_summary(results, args.out)
    return 1 if failed else 0


def _print_summary(results: dict, out: str) -> None:
    print(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'report.md'}")
    for name, record in results["methods"].items():
        if record.get("failed"):
            print(f"{name:>16}: FAILED: {record['failed']}")
            print(f"cmrkit bench: error: {record['failed']}", file=sys.stderr)
            continue
        final = record["metrics"]["final_avg"]
        print(
            f"{name:>16}: final avg R@1  T2I {final['t2i']['R@1']:.1f}  "
            f"I2T {final['i2t']['R@1']:.1f}"
        )


def _method_options(pairs: list[str]) -> dict[str, dict]:
    options: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {pair!r}: expected METHOD.KEY=VALUE")
        options.setdefault(method, {})[option] = _number_or_yaml(value)
    return options


def _number_or_yaml(text: str):
    """``5e-5`` is a float here (YAML 1.1 would read it as a string); anything else is YAML."""
    import yaml

    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return yaml.safe_load(text)


# --- pretrain ---------------------------------------------------------------------------------
def _pretrain_parser(sub) -> None:
    from .train.pretrain import PretrainConfig

    p = sub.add_parser("pretrain", help="pretrain the image tower of the embedded backbone")
    p.add_argument("--data-root", help="folder holding cmr-base (default: $CMRKIT_DATA)")
    defaults = PretrainConfig(data_root="")
    for f in fields(PretrainConfig):
        if f.name == "cls_domains":
            p.add_argument("--cls-domains", action="store_true", help=PRETRAIN_HELP[f.name])
        elif f.name != "data_root":
            default = getattr(defaults, f.name)
            p.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=int if default is None else type(default),  # None: an optional count
                default=default,
                help=PRETRAIN_HELP[f.name],
            )
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args) -> int:
    from . import distributed
    from .data.suites import default_data_root
    from .train.pretrain import PretrainConfig, pretrain

    root = args.data_root or default_data_root()
    if root is None:
        raise ValueError("no data root: pass --data-root or set CMRKIT_DATA")
    values = {
        f.name: getattr(args, f.name) for f in fields(PretrainConfig) if f.name != "data_root"
    }
    info = pretrain(PretrainConfig(data_root=str(root), **values))
    if distributed.is_main():  # under torchrun, rank 0 reports what it wrote
        print(json.dumps(info, indent=2))
    return 0


# --- eval -------------------------------------------------------------------------------------
def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot evaluation of a backbone on a suite")
    _common_data_args(p)
    p.add_argument("--out", help="write the numbers as JSON here")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from .backbones import load_backbone
    from .bench import holdout
    from .data.suites import load_suite
    from .eval.retrieval import evaluate_retrieval
    from .eval.zeroshot import zeroshot_classify
    from .utils import check_writable_dir, write_json

    if args.out:  # proved writable now, not after all the work
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: is a folder; give a JSON file path")
        check_writable_dir(Path(args.out).parent, "--out")
    suite = load_suite(
        args.suite,
        args.data_root,
        skip_bad=args.skip_bad,
        allow_outside=args.allow_outside_files,
        split_dir=Path(args.out).parent / "splits" if args.out else None,
    )
    holdout(suite, _split(args.holdout))
    backbone = load_backbone(args.backbone)
    if args.device:
        backbone.to(args.device)
    out = {"backbone": args.backbone, "suite": suite.name, "retrieval": {}, "classification": {}}
    print(
        f"{'task':<12}{'gallery':>8}{'chance':>8}{'T2I R@1':>9}{'R@5':>7}{'I2T R@1':>9}{'R@5':>7}"
    )
    for task in suite.tasks + suite.retrieval_probes:
        ds = suite.load(task.name, "test")
        recall, _ = evaluate_retrieval(backbone, ds, args.eval_batch_size)
        chance = 100.0 / len(ds)
        out["retrieval"][task.name] = {**recall, "gallery": len(ds), "chance_R@1": chance}
        t2i, i2t = recall["t2i"], recall["i2t"]
        print(
            f"{task.name:<12}{len(ds):>8}{chance:>8.2f}{t2i['R@1']:>9.1f}{t2i['R@5']:>7.1f}"
            f"{i2t['R@1']:>9.1f}{i2t['R@5']:>7.1f}"
        )
    for probe in suite.classification_probes:
        ds = suite.load(probe.name, "test")
        acc = zeroshot_classify(backbone, ds, batch_size=args.eval_batch_size)
        classes = len({label for label in ds.labels if label is not None})
        out["classification"][probe.name] = {**acc, "classes": classes}
        print(
            f"{probe.name}: zero-shot top-1 {acc['top1']:.1f} / top-5 {acc['top5']:.1f} "
            f"({classes} classes, chance {100 / classes:.2f})"
        )
    if args.out:
        write_json(args.out, {**out, "skipped": suite.skipped()})
    return 0


# --- data check -------------------------------------------------------------------------------
def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(
        dest="data_command",
        required=True,
        metavar="SUBCOMMAND",
        help="one of the data commands below",
    )
    check = data_sub.add_parser("check", help="counts, missing files and manifest hashes")
    check.add_argument(
        "path", nargs="?", help="an imagefolder split, or a folder of them with manifest.json"
    )
    check.add_argument("--suite", help="instead of PATH: every split of this suite (name or YAML)")
    check.add_argument("--data-root", help="the suite's data root (default: $CMRKIT_DATA)")
    check.add_argument("--skip-bad", action="store_true", help="report bad rows instead of failing")
    check.add_argument(
        "--allow-outside-files",
        action="store_true",
        help="accept file_name entries that leave their split folder (../, absolute, symlinks)",
    )
    check.set_defaults(run=_run_data_check)
    prepare = data_sub.add_parser(
        "prepare",
        help="local copies of a suite's hub datasets, with stored splits and hashes",
        description="Fetch every Hugging Face source of a suite (where the hub is reachable) "
        "into DIR/<id>, store its seeded splits and the files' SHA-256 (DIR/prepared.json); "
        "then run the suite offline with --data-root DIR. Prints one line per dataset.",
    )
    prepare.add_argument("suite", help="suite name (e.g. cmr-paper) or path of a suite YAML")
    prepare.add_argument("--out", required=True, metavar="DIR", help="folder for the local copies")
    prepare.set_defaults(run=_run_data_prepare)


def _run_data_check(args) -> int:
    from .data.check import check_path, check_suite
    from .data.suites import load_suite

    if (args.path is None) == (args.suite is None):
        raise ValueError("give a PATH or --suite NAME (one of them)")
    if args.suite:
        suite = load_suite(args.suite, args.data_root, allow_outside=args.allow_outside_files)
        report = check_suite(suite)
    else:
        report = check_path(
            Path(args.path), skip_bad=args.skip_bad, allow_outside=args.allow_outside_files
        )
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def _run_data_prepare(args) -> int:
    from .data.prepare import prepare_suite
    from .utils import check_writable_dir

    check_writable_dir(Path(args.out), "--out")
    record = prepare_suite(args.suite, Path(args.out))
    print(f"wrote {Path(args.out) / 'prepared.json'}")
    return 1 if record["unreachable"] else 0


def _seeds(value: str | None) -> list[int]:
    try:
        return [int(v) for v in _split(value)]
    except ValueError:
        raise ValueError(f"--seeds {value!r}: expected whole numbers, e.g. 0,1,2") from None


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


if __name__ == "__main__":
    sys.exit(main())
