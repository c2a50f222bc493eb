"""``cmrkit adapters``: inspect adapter banks, export one adapter to PEFT, import one from PEFT."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("adapters", help="adapter banks: info, PEFT export and import")
    cmd = p.add_subparsers(
        dest="adapters_command",
        required=True,
        metavar="SUBCOMMAND",
        help="one of the adapters commands below",
    )

    info = cmd.add_parser("info", help="describe a bank folder or a PEFT adapter folder")
    info.add_argument("path", help="a bank folder (bank.json) or a PEFT adapter folder")
    info.set_defaults(run=_run_info)

    export = cmd.add_parser("export-peft", help="write one adapter of a bank in PEFT's layout")
    export.add_argument("bank", help="bank folder (adapters.safetensors + bank.json)")
    export.add_argument("--adapter", required=True, help="adapter name (task) or index")
    export.add_argument("--backbone", required=True, help="the backbone the bank was trained on")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(run=_run_export)

    imp = cmd.add_parser(
        "import-peft", help="add a PEFT LoRA adapter to a bank, with prototypes from its data"
    )
    imp.add_argument("peft", help="PEFT adapter folder (adapter_config.json + safetensors)")
    imp.add_argument("--bank", required=True, help="bank folder to extend (created if missing)")
    imp.add_argument("--backbone", required=True, help="the backbone the adapter was trained on")
    imp.add_argument("--data", required=True, help="imagefolder split the adapter was trained on")
    imp.add_argument("--name", help="task name of the adapter (default: the data folder's name)")
    imp.set_defaults(run=_run_import)


def _run_info(args) -> int:
    from .persistence import BANK_FILE, PEFT_CONFIG, read_bank_meta

    path = Path(args.path)
    if (path / BANK_FILE).is_file():
        meta = read_bank_meta(path)
        print(f"bank {path}: backbone {_backbone_spec(meta)} ({meta['backbone']['fingerprint']})")
        print(f"  {len(meta['layers'])} wrapped layers, {len(meta['adapters'])} adapters")
        for i, a in enumerate(meta["adapters"]):
            print(f"  [{i}] {a['name']}: r={a['rank']} alpha={a['alpha']} dropout={a['dropout']}")
        for key in ("router", "merge"):
            if key in meta["extra"]:
                print(f"  {key}: {json.dumps(meta['extra'][key])}")
        return 0
    if (path / PEFT_CONFIG).is_file():
        c = json.loads((path / PEFT_CONFIG).read_text())
        targets = len(c.get("target_modules") or [])
        print(f"PEFT {c.get('peft_type')} adapter {path}")
        print(f"  base model {c.get('base_model_name_or_path')}")
        print(f"  r={c.get('r')} alpha={c.get('lora_alpha')} dropout={c.get('lora_dropout')}")
        print(f"  {targets} target modules")
        return 0
    raise FileNotFoundError(f"{path}: neither {BANK_FILE} nor {PEFT_CONFIG} found")


def _run_export(args) -> int:
    from ..backbones import load_backbone
    from ..routing import RoutedEncoder
    from .persistence import export_peft

    backbone = load_backbone(args.backbone)
    encoder = RoutedEncoder.load(args.bank, backbone)
    names = encoder.adapter_names
    if args.adapter in names:
        idx = names.index(args.adapter)
    elif args.adapter.isdigit() and int(args.adapter) < len(names):
        idx = int(args.adapter)
    else:
        raise ValueError(f"{args.bank}: no adapter {args.adapter!r}; adapters: {names}")
    export_peft(
        encoder.bank,
        idx,
        args.out,
        base_model=backbone.stock_model_id,
        module_prefix=backbone.stock_model_prefix,
    )
    print(f"wrote adapter {idx} ({names[idx]}) to {args.out}")
    return 0


def _run_import(args) -> int:
    from ..backbones import load_backbone
    from ..data.dataset import load_imagefolder
    from ..routing import PrototypeMemory, RoutedEncoder, task_features
    from .inject import inject_lora_bank
    from .persistence import BANK_FILE, import_peft

    backbone = load_backbone(args.backbone)
    if (Path(args.bank) / BANK_FILE).is_file():
        encoder = RoutedEncoder.load(args.bank, backbone)
    else:
        backbone.requires_grad_(False)
        bank = inject_lora_bank(backbone, backbone.lora_targets)
        encoder = RoutedEncoder(backbone, bank, PrototypeMemory(backbone.embed_dim)).eval()
    idx = import_peft(args.peft, encoder.bank, module_prefix=backbone.stock_model_prefix)
    ds = load_imagefolder(args.data, name=args.name)
    # The new adapter's prototypes, from the frozen backbone over its data (as after training).
    slot = encoder.memory.add(task_features(backbone, ds, encoder.bank), ds.name)
    assert slot == idx, "prototype slots and adapters must stay aligned"
    encoder.save(args.bank)
    print(f"added adapter {idx} ({ds.name}) to {args.bank}")
    return 0


def _backbone_spec(meta: dict) -> str:
    """The spec the bank's backbone was loaded with (bench records it), else its name."""
    return meta["backbone"].get("spec") or meta["backbone"]["name"]
