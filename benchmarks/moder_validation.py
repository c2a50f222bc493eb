"""Choose MoDER's unstated constants on a validation split of *training* classes only.

Per domain (icons, glyphs; evaluation renderings; **train split only**, no test item is read): a
seeded subset of at most 80 classes is halved (seeded, not the base-to-novel seed). "val-seen"
classes get experts trained on 70 % of their train items and are scored on the other 30 %;
"val-unseen" classes are never trained and are scored on all their train items through the hub,
argmax over all the subset's classes (as Class-IL's CI-Transfer). Training settings (n_ctx, lr,
epochs) are chosen on val-seen accuracy; the mixture's k, tau, alpha and composition on val-unseen
accuracy, with the experts of ``--mix-setting`` (default: the chosen n_ctx 2, lr 2e-3, 10
epochs) and of the same setting without template augmentation (the ablation).
alpha 0 is moder_nohub: unseen classes zero-shot, seen classes their experts (not the zero-shot
row, where seen classes are zero-shot too: with argmax over all classes the experts move it).

    python benchmarks/moder_validation.py --out runs/moder-val.json   # ~10 min on one core
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time

import torch

from cmrkit.backbones import load_backbone
from cmrkit.data.classification import LabelledSet, base_novel_split, load_cls_suite
from cmrkit.eval.retrieval import embed_images
from cmrkit.eval.zeroshot import class_embeddings, prototype_ranks
from cmrkit.methods import TaskContext, build_method
from cmrkit.train.loop import TrainConfig, train_task
from cmrkit.utils import seed_everything

VAL_SEED = 123


def split_train(train: LabelledSet):
    seen, unseen = base_novel_split(len(train.classes), VAL_SEED)
    rng = random.Random(VAL_SEED)
    fit, held = [], []
    for i, y in enumerate(train.targets.tolist()):
        if y in seen:
            (fit if rng.random() < 0.7 else held).append(i)
    return seen, unseen, fit, held


def accuracy(method, data: LabelledSet, items: list[int], images: torch.Tensor) -> float:
    protos = method.class_prototypes(data.prompt_names, data.templates)
    ranks = prototype_ranks(images[items], protos, data.targets[items])
    return 100.0 * (ranks == 0).double().mean().item()


def key_neighbours(backbone, data: LabelledSet, tau: float = 0.1) -> dict:
    """How well the hub's keys (template-averaged class-name embeddings) tell classes apart: mean
    cosine to the 1st and 5th nearest other class, and softmax(sim / tau) over the top 5."""
    keys = class_embeddings(backbone, data.prompt_names, data.templates)
    sims = keys @ keys.T
    sims.fill_diagonal_(-2.0)
    top = sims.topk(min(5, len(keys) - 1), dim=1).values
    weights = torch.softmax(top / tau, dim=1).mean(0)
    return {
        "nn1_cos": top[:, 0].mean().item(),
        "nn5_cos": top[:, -1].mean().item(),
        "top5_weights": [round(w, 3) for w in weights.tolist()],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default="cmrkit-mini-cls")
    p.add_argument("--domains", default="icons,glyphs")
    p.add_argument("--max-fit", type=int, default=600, help="cap on fitting items (time)")
    p.add_argument("--max-classes", type=int, default=80, help="cap on classes (time)")
    p.add_argument("--mix-setting", type=int, default=4, help="experts of this training setting")
    p.add_argument("--smoke", action="store_true", help="one setting of each grid (a check)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("CMRKIT_THREADS", "1")))
    report = {"backbone": args.backbone, "seed": VAL_SEED, "domains": {}}
    grid_train = [
        {"n_ctx": n, "lr": lr, "epochs": ep}
        for n, lr, ep in [(1, 2e-3, 5), (2, 2e-3, 5), (4, 2e-3, 5), (2, 1e-2, 5), (2, 2e-3, 10)]
    ]
    grid_train += [  # more epochs; the template-augmentation ablation at the chosen setting
        {"n_ctx": 2, "lr": 2e-3, "epochs": 20},
        {"n_ctx": 2, "lr": 2e-3, "epochs": 10, "template_augmentation": False},
    ]
    grid_mix = [
        {"k": k, "tau": tau, "alpha": a, "composition": comp}
        for k, tau, a, comp in itertools.product(
            (1, 3, 5), (0.05, 0.1, 1.0), (0.0, 0.1, 0.25, 0.5, 0.75, 1.0), ("token", "prototype")
        )
    ]
    mix_on = [grid_train[args.mix_setting], grid_train[-1]]  # and without template augmentation
    if args.smoke:
        grid_train, grid_mix, mix_on = grid_train[:1], grid_mix[:2], grid_train[:1]
    for domain in args.domains.split(","):
        suite = load_cls_suite(f"cls-{domain}")
        train, _ = suite.datasets[domain]
        if len(train.classes) > args.max_classes:  # a seeded subset of classes (time)
            chosen = random.Random(VAL_SEED).sample(range(len(train.classes)), args.max_classes)
            train = train.relabel(sorted(chosen))
        seen, unseen, fit, held = split_train(train)
        fit = sorted(random.Random(VAL_SEED).sample(fit, min(args.max_fit, len(fit))))
        backbone = load_backbone(args.backbone)
        images = embed_images(backbone, train.data, 256, progress=False)
        unseen_items = [i for i, y in enumerate(train.targets.tolist()) if y in unseen]
        zs = build_method("zeroshot", backbone)
        rows = {
            "zeroshot": {
                "seen": accuracy(zs, train, held, images),
                "unseen": accuracy(zs, train, unseen_items, images),
            }
        }
        names = [train.prompt_names[c] for c in seen]
        fit_data = train.data.subset(fit)
        fit_data.captions = [[train.prompt_names[train.targets[i]]] for i in fit]
        for setting in grid_train:
            tic = time.time()
            seed_everything(0)
            method = build_method(
                "moder",
                load_backbone(args.backbone),
                n_ctx=setting["n_ctx"],
                template_augmentation=setting.get("template_augmentation", True),
            )
            cfg = TrainConfig(
                epochs=setting["epochs"],
                batch_size=64,
                lr=setting["lr"],
                weight_decay=0.0,
                warmup_epochs=0,
                progress=False,
            )
            ctx = TaskContext(0, domain, fit_data, cfg, classes=names, templates=train.templates)
            method.begin_task(ctx)
            train_task(method, fit_data, cfg, 0)
            method.end_task(ctx)
            key = json.dumps(setting)
            rows[key] = {
                "seen": accuracy(method, train, held, images),
                "train_s": time.time() - tic,
            }
            if setting not in mix_on:
                continue  # the mixture's constants are chosen on one setting's experts
            for mix in grid_mix:
                method.k, method.tau, method.alpha = mix["k"], mix["tau"], mix["alpha"]
                method.composition = mix["composition"]
                rows[key][json.dumps(mix)] = accuracy(method, train, unseen_items, images)
            print(domain, key, f"seen {rows[key]['seen']:.1f}", flush=True)
        report["domains"][domain] = {
            "classes": len(train.classes),
            "val_seen": len(seen),
            "val_unseen": len(unseen),
            "fit_items": len(fit),
            "held_items": len(held),
            "unseen_items": len(unseen_items),
            "hub_keys": key_neighbours(backbone, train),
            "results": rows,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
