"""MoDER's ablations on a Class-IL test protocol (issue 11): each variant changes one option of the
shipped config (``configs/methods/moder.yaml``), is run through ``cmrkit classify`` on its own,
and is reported with CI-Transfer (the unseen-class metric MoDER is about) and final average, each
with its 95 % bootstrap interval over test items. The variants share the suite, its class split
and the training seed, so only the option differs. alpha 0 is ``moder_nohub`` (seen classes their
experts, unseen classes zero-shot); the zero-shot row is the plain backbone.

The constants were chosen on validation classes (``moder_validation.py``); this table is what the
choices do on test, read after the choice, not used for it.

    python benchmarks/moder_ablation.py --suite cls-icons --out runs/moder-ablation-icons
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cmrkit.classify import ClassifyConfig, run_classify
from cmrkit.utils import atomic_write

VARIANTS: dict[str, dict] = {
    "shipped (prototype, k 3, tau 0.1, alpha 0.5)": {},
    "token-space composition": {"composition": "token"},
    "k 1": {"k": 1},
    "k 5": {"k": 5},
    "tau 0.05": {"tau": 0.05},
    "tau 1": {"tau": 1.0},
    "alpha 0.25": {"alpha": 0.25},
    "alpha 0.75": {"alpha": 0.75},
    "alpha 1 (no zero-shot smoothing)": {"alpha": 1.0},
    "no template augmentation": {"template_augmentation": False},
}
REFERENCES = ("zeroshot", "moder_nohub")  # one run: the plain backbone and alpha 0


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.split(" (")[0]).strip("-")


def run(suite: str, out: Path, methods: list[str], args, moder_options: dict | None = None) -> dict:
    cfg = ClassifyConfig(
        suite=suite,
        methods=methods,
        out=str(out),
        data_root=args.data_root,
        method_options={"moder": moder_options} if moder_options else {},
        train_overrides={"progress": False},
        resume=True,  # a killed sweep continues; a finished variant is read back
        device="cpu",
    )
    return run_classify(cfg)["methods"]


def cell(metric: dict) -> str:
    lo, hi = metric["ci"]
    return f"{metric['value']:.1f} [{lo:.1f}, {hi:.1f}]"


def row(name: str, record: dict) -> str:
    m = record["metrics"]
    return f"| {name} | {cell(m['ci_transfer'])} | {cell(m['last'])} | {record['wall_s']:.0f} s |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="cls-icons", help="a Class-IL suite (cls-icons, cls-glyphs)")
    p.add_argument("--out", type=Path, required=True, help="one sub-folder per variant + table.md")
    p.add_argument("--data-root", help="data root (default: $CMRKIT_DATA, else ../shared/data)")
    p.add_argument("--only", help="comma-separated variant slugs to run (default: all)")
    args = p.parse_args()
    only = set(args.only.split(",")) if args.only else None
    lines = [
        f"# MoDER ablations, Class-IL on {args.suite} (top-1 %, 95 % interval)",
        "",
        "| variant | CI-Transfer | final avg | wall |",
        "|---|---:|---:|---:|",
    ]
    refs = run(args.suite, args.out / "references", list(REFERENCES), args)
    lines += [row(n, refs[n]) for n in REFERENCES]
    for name, options in VARIANTS.items():
        if only and slug(name) not in only:
            continue
        record = run(args.suite, args.out / slug(name), ["moder"], args, options)["moder"]
        lines.append(row(name, record))
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    atomic_write(args.out / "table.md", lambda path: path.write_text(text, encoding="utf-8"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
