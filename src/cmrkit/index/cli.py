"""``cmrkit index build|update|search|info``: a routed gallery index from the command line."""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cmrkit.index.gallery import GalleryIndex, is_index

ADAPTERS_HELP = (
    "adapter bank folder (bank.json + adapters.safetensors), or a bench run folder whose "
    "banks/<method>/ holds one (DAR writes RUN/banks/dar)"
)


def register(sub) -> None:
    p = sub.add_parser("index", help="build, update and search a routed gallery index")
    isub = p.add_subparsers(
        dest="index_command",
        required=True,
        metavar="SUBCOMMAND",
        help="one of the index commands below",
    )

    b = isub.add_parser("build", help="embed a gallery with a DAR adapter bank")
    b.add_argument("--adapters", required=True, help=ADAPTERS_HELP)
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagefolder", help="a Hugging Face imagefolder split")
    src.add_argument("--suite", help="a suite name or YAML: its tasks' split, jointly")
    b.add_argument("--tasks", default="", help="with --suite: comma-separated tasks (default all)")
    b.add_argument("--split", default="test", help="with --suite: the split to index")
    b.add_argument("--data-root", help="data root for --suite (default: $CMRKIT_DATA)")
    b.add_argument("--out", required=True, help="index folder (new, empty, or an index)")
    b.add_argument(
        "--overwrite", action="store_true", help="replace the index already in --out (new version)"
    )
    _common(b)
    b.set_defaults(run=_run_build)

    u = isub.add_parser("update", help="bring an index up to a new adapter bank")
    u.add_argument("--index", required=True, help="index folder")
    u.add_argument("--adapters", required=True, help="the new " + ADAPTERS_HELP)
    _common(u)
    u.set_defaults(run=_run_update)

    s = isub.add_parser("search", help="text and/or image queries against an index")
    s.add_argument("--index", required=True, help="index folder")
    s.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    s.add_argument("--image", action="append", default=[], help="an image query (repeatable)")
    s.add_argument("-k", type=int, default=10, help="results per query")
    s.add_argument("--adapters", help="adapter bank (default: the one the index was built with)")
    s.add_argument(
        "--update",
        action="store_true",
        help="if the bank differs from the index's, update the index to it first (and save)",
    )
    _common(s)
    s.set_defaults(run=_run_search)

    i = isub.add_parser("info", help="size, adapter fingerprint and route counts of an index")
    i.add_argument("--index", required=True, help="index folder")
    i.add_argument(
        "--verify", action="store_true", help="full check: vectors, routes, FAISS (exit 2 if bad)"
    )
    i.set_defaults(run=_run_info)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        help="backbone spec to load (default: the one the bank records, if built in or allowed)",
    )
    p.add_argument(
        "--allow-backbone",
        action="append",
        default=[],
        metavar="SPEC",
        help="a recorded backbone spec that may be loaded without --backbone (repeatable)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="items per embedding batch")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cpu (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def load_routed_encoder(
    bank_dir: str | Path,
    backbone: str | None,
    device: str | None,
    allow_backbones: Sequence[str] = (),
    share: Any = None,
) -> Any:
    """DAR's routed encoder for a saved adapter bank (or a bench run folder holding one).

    ``backbone``: the spec the caller chose. Without it, the spec the bank records is loaded only
    if it is a built-in model (cmrkit-mini, tiny-*) or listed in ``allow_backbones``: a bank file
    never chooses by itself a model folder or hub id to load. Either way the loaded model must
    match the fingerprint the bank recorded.

    ``share``: a loaded routed encoder. If its backbone is the spec to load, the new encoder is
    built on that model's frozen weights instead of a second copy of them (``cmrkit serve``
    swapping banks holds one backbone in memory, not two).
    """
    from cmrkit.adapters.persistence import read_bank_meta, resolve_bank_dir, trusted_backbone
    from cmrkit.backbones import load_backbone
    from cmrkit.routing import RoutedEncoder

    bank_dir = resolve_bank_dir(bank_dir)
    meta = read_bank_meta(bank_dir)
    spec = trusted_backbone(meta, bank_dir, backbone, allow_backbones)
    if share is not None and getattr(share, "backbone_spec", None) == spec:
        model = _without_bank_sharing_weights(share.backbone)
    else:
        model = load_backbone(spec)
    encoder = RoutedEncoder.load(bank_dir, model)
    encoder.backbone_spec = spec
    encoder.bank_dir = bank_dir.resolve()
    if device:
        encoder.to(device)
    return encoder.eval()


def _without_bank_sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a bank-wrapped ``model`` as it was before its bank: each LoRA bank layer is its
    base Linear again, and every other parameter and buffer is the original tensor (shared, not
    copied: they are frozen), so the copy costs module objects, not weights."""
    from cmrkit.adapters.lora_bank import LoRABankLinear

    shared: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, LoRABankLinear):
            shared[id(module)] = module.base  # the Linear itself, shared by both models
    for tensor in (*model.parameters(), *model.buffers()):
        shared[id(tensor)] = tensor
    return copy.deepcopy(model, memo=shared)


def _setup(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _gallery_source(args) -> dict:
    """How the gallery was read, stored in the index so that ``update`` can read it again."""
    if args.imagefolder:
        return {"imagefolder": str(Path(args.imagefolder).resolve())}
    root = str(Path(args.data_root).resolve()) if args.data_root else None
    suite = str(Path(args.suite).resolve()) if Path(args.suite).is_file() else args.suite
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return {"suite": suite, "split": args.split, "tasks": tasks, "data_root": root}


def _gallery(source: dict):
    from cmrkit.data.dataset import ImageCaptionDataset, load_imagefolder

    if "imagefolder" in source:
        return load_imagefolder(source["imagefolder"])
    from cmrkit.data.suites import load_suite

    suite = load_suite(source["suite"], source.get("data_root"))
    names = source.get("tasks") or [t.name for t in suite.tasks]
    parts = [suite.load(name, source["split"]) for name in names]
    # Joint gallery: ids prefixed by task so that items of different tasks never collide.
    return ImageCaptionDataset(
        name=suite.name,
        images=[im for p in parts for im in p.images],
        captions=[c for p in parts for c in p.captions],
        labels=[lab for p in parts for lab in p.labels],
        ids=[f"{p.name}/{i}" for p in parts for i in p.ids],
    )


def _run_build(args) -> int:
    _setup(args)
    if is_index(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out}: an index is already there; pass --overwrite")
    encoder = _encoder(args, args.adapters)
    source = _gallery_source(args)
    ds = _gallery(source)
    index = GalleryIndex(encoder.embed_dim)
    t0 = time.perf_counter()
    index.add_dataset(encoder, ds, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    index.meta = {
        "backbone": encoder.backbone_spec,
        "adapters": str(encoder.bank_dir),
        "source": args.imagefolder or f"{args.suite}:{args.split}",
        "gallery": source,
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    index.save(args.out)  # refuses a non-empty folder that is not an index
    print(
        f"indexed {len(index)} items with {index.fingerprint['num_adapters']} adapters in "
        f"{seconds:.1f} s ({len(index) / max(seconds, 1e-9):.1f} items/s) -> {args.out}"
    )
    return 0


def _run_update(args) -> int:
    _setup(args)
    index = GalleryIndex.load(args.index)
    encoder = _encoder(args, args.adapters)
    before = index.fingerprint["num_adapters"]
    stats = _update(index, encoder, args)
    t0 = time.perf_counter()
    index.save(args.index)
    save_s = time.perf_counter() - t0
    print(
        f"adapters {before} -> {index.fingerprint['num_adapters']}"
        + (f" (changed: {stats.adapters_changed})" if stats.adapters_changed else "")
    )
    print(
        f"re-embedded {stats.reembedded} / {stats.total} items ({100 * stats.share:.1f}%; "
        f"{stats.route_changed} changed route); re-route {stats.route_seconds:.2f} s, "
        f"re-embed {stats.embed_seconds:.2f} s, save {save_s:.2f} s"
    )
    return 0


@torch.no_grad()
def _run_search(args) -> int:
    _setup(args)
    if not args.text and not args.image:
        raise ValueError("give at least one --text or --image query")
    index = GalleryIndex.load(args.index)
    bank = args.adapters or index.meta.get("adapters")
    if not bank:
        raise ValueError("the index does not name its adapter bank: pass --adapters")
    encoder = _encoder(args, bank)
    if args.update:
        try:
            index.check_encoder(encoder)
        except ValueError:
            stats = _update(index, encoder, args)
            index.save(args.index)
            print(f"updated the index first: re-embedded {stats.reembedded} / {stats.total}")
    source = f"--adapters {bank}" if args.adapters else f"the bank {bank}"
    index.check_encoder(encoder, f"{source} (or pass --update)")
    names = list(encoder.adapter_names)
    queries: list[tuple[str, torch.Tensor, Any]] = []
    for text in args.text:
        tokens = {k: v.to(encoder.device) for k, v in encoder.tokenize([text]).items()}
        route = encoder.route(encoder.backbone_text_features(tokens), "text")
        queries.append((f"text {text!r}", encoder.encode_text_routed(tokens, route), route))
    for path in args.image:
        from PIL import Image

        with Image.open(path) as im:
            pixels = encoder.image_transform(im.convert("RGB")).unsqueeze(0).to(encoder.device)
        route = encoder.route(encoder.backbone_image_features(pixels), "image")
        queries.append((f"image {path}", encoder.encode_image_routed(pixels, route), route))
    for label, emb, route in queries:
        ids, scores = index.search(emb, args.k)
        print(f"\nquery {label} routed to {_route_label(route, names)}")
        print(f"{'rank':>4} {'score':>7}  {'adapters':<28} id / caption")
        for rank, (item_id, score) in enumerate(zip(ids[0], scores[0].tolist()), 1):
            row = index.row(item_id)
            routed = "+".join(f"{n}({w:.2f})" for n, w in index.adapter_names_of(item_id))
            caption = (index.captions[row] or [""])[0]
            where = index.paths[row] or item_id
            print(f"{rank:>4} {score:>7.4f}  {routed or '(backbone)':<28} {item_id}  [{where}]")
            if caption:
                print(f"{'':>13}{caption[:100]}")
    return 0


def _route_label(route: Any, names: list[str]) -> str:
    pairs = [
        (names[i] if i < len(names) else f"adapter{i}", w)
        for i, w in zip(route.indices[0].tolist(), route.weights[0].tolist())
        if i >= 0
    ]
    return "+".join(f"{n}({w:.2f})" for n, w in pairs) or "(bare backbone)"


def _run_info(args) -> int:
    import json

    index = GalleryIndex.load(args.index)  # checks every checksum
    info = index.info()
    if args.verify:
        if problems := index.verify():
            raise ValueError(f"{args.index}: index damaged: {'; '.join(problems)}")
        info["verified"] = True
    print(json.dumps(info, indent=2))
    return 0


def _encoder(args, bank: str | Path) -> Any:
    return load_routed_encoder(bank, args.backbone, args.device, args.allow_backbone)


def _update(index: GalleryIndex, encoder: Any, args):
    """``index.update`` reading images from stored paths or, for items without one (in-memory
    or Hugging Face images), from the gallery source the index recorded."""
    load = None
    if any(p is None for p in index.paths):
        source = index.meta.get("gallery")
        if not source:
            raise ValueError(
                f"--index {args.index}: items without a source path, and no recorded gallery "
                "source to read them from (index built before cmrkit recorded it): rebuild it"
            )
        ds = _gallery(source)
        position = {item_id: i for i, item_id in enumerate(ds.ids)}

        def load(row: int):
            item_id = index.ids[row]
            if item_id not in position:
                raise ValueError(f"item {item_id!r} is no longer in the gallery source {source}")
            return ds.load_image(position[item_id])

    stats = index.update(encoder, load_image=load, batch_size=args.batch_size)
    index.meta["adapters"] = str(encoder.bank_dir)
    return stats
