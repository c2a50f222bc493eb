"""Adapter banks on disk: safetensors plus JSON (never pickles), and the PEFT layout.

A bank folder holds two files:

* ``adapters.safetensors``: adapter ``i`` of wrapped layer ``L`` as ``adapters.i.L.lora_A`` (r, n)
  and ``adapters.i.L.lora_B`` (m, r), unscaled as trained; plus any extra tensors of the owner
  (DAR stores its prototype memory here).
* ``bank.json``: format version, the backbone's identity, the wrapped layers, each adapter's
  rank / alpha / dropout / name, and the owner's JSON state (DAR: routing and merge settings).

One adapter also exports to (and imports from) PEFT's LoRA layout: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight``. Both sides
use ``ΔW = (alpha / r) · B A``, so tensors are copied as they are.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cmrkit.adapters.inject import LoRABank, LoRABankLinear, inject_lora_bank
from cmrkit.utils import atomic_write, write_json

BANK_FILE = "bank.json"
WEIGHTS_FILE = "adapters.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FORMAT = "cmrkit-adapter-bank"
VERSION = 1
ADAPTER_PREFIX = "adapters."
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


# --- identity of a backbone ---------------------------------------------------------------------
def backbone_id(model: nn.Module) -> dict[str, Any]:
    """Name plus a fingerprint of the wrapped layers: their names, shapes and first weights.

    The weights are rounded so that the same checkpoint in fp16 and fp32 (or on another device)
    has the same fingerprint, while a different model or a different seed does not.
    """
    h = hashlib.sha256()
    for name, layer in sorted(_wrapped(model).items()):
        w = layer.weight.detach()  # LoRABankLinear exposes its base Linear's weight
        h.update(f"{name}:{tuple(w.shape)};".encode())
        h.update(
            torch.round(w.flatten()[:16].float().cpu() * 1e3).to(torch.int64).numpy().tobytes()
        )
    ident = {
        "name": getattr(model, "name", type(model).__name__),
        "fingerprint": h.hexdigest()[:16],
    }
    if spec := getattr(model, "spec", None):  # how it was loaded (bench sets it): reloads it
        ident["spec"] = spec
    return ident


def _wrapped(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-wrapped Linears by name (the plain Linears if the model holds no bank yet)."""
    banks = {n: m for n, m in model.named_modules() if isinstance(m, LoRABankLinear)}
    if banks:
        return banks
    targets = getattr(model, "lora_targets", ())
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    }


# --- tensors of a bank --------------------------------------------------------------------------
def bank_state_dict(bank: LoRABank) -> dict[str, Tensor]:
    """Every adapter's tensors under ``adapters.<i>.<layer>.lora_A|lora_B``."""
    return {
        f"{ADAPTER_PREFIX}{i}.{key}": value
        for i in range(bank.num_adapters)
        for key, value in bank.adapter_state_dict(i).items()
    }


def bank_configs(bank: LoRABank) -> list[dict[str, float]]:
    """rank, alpha and dropout of each adapter, in order."""
    return [bank.adapter_config(i) for i in range(bank.num_adapters)]


def restore_bank(
    bank: LoRABank, configs: Sequence[Mapping[str, Any]], state: Mapping[str, Tensor], source: str
) -> None:
    """Give ``bank`` the adapters described by ``configs`` (adding the missing ones) and load
    their tensors from ``state``; any mismatch is a ValueError naming ``source``."""
    if bank.num_adapters > len(configs):
        raise ValueError(
            f"{source}: describes {len(configs)} adapters, the bank already has {bank.num_adapters}"
        )
    for config in configs[bank.num_adapters :]:
        bank.add_adapter(int(config["rank"]), float(config["alpha"]), float(config["dropout"]))
    for i in range(len(configs)):
        prefix = f"{ADAPTER_PREFIX}{i}."
        tensors = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        try:
            bank.load_adapter_state_dict(i, tensors)
        except ValueError as e:
            raise ValueError(f"{source}: adapter {i} does not fit this backbone: {e}") from None


# --- bank folders -------------------------------------------------------------------------------
def save_bank(
    folder: str | Path,
    bank: LoRABank,
    model: nn.Module,
    *,
    names: Sequence[str] | None = None,
    extra_tensors: Mapping[str, Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``adapters.safetensors`` and ``bank.json`` into ``folder``; return the folder."""
    folder = Path(folder)
    extra_tensors = dict(extra_tensors or {})
    if clash := [k for k in extra_tensors if k.startswith(ADAPTER_PREFIX)]:
        raise ValueError(f"extra tensor names may not start with {ADAPTER_PREFIX!r}: {clash}")
    names = list(names) if names is not None else [f"adapter{i}" for i in range(bank.num_adapters)]
    if len(names) != bank.num_adapters:
        raise ValueError(f"{len(names)} names for {bank.num_adapters} adapters")
    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in {**bank_state_dict(bank), **extra_tensors}.items()
    }
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": backbone_id(model),
        "layers": sorted(bank.layers),
        "adapters": [{"name": n, **c} for n, c in zip(names, bank_configs(bank), strict=True)],
        "extra": dict(extra or {}),
    }
    write_json(folder / BANK_FILE, meta)
    return folder


def read_bank_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / BANK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter bank here (expected {BANK_FILE})")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: not a {FORMAT} v{VERSION} file "
            f"(format={meta.get('format')!r}, version={meta.get('version')!r})"
        )
    return meta


def resolve_bank_dir(path: str | Path) -> Path:
    """A bank folder, or the one bank of a bench run folder (``RUN/banks/<method>/``)."""
    path = Path(path)
    if (path / BANK_FILE).is_file():
        return path
    banks = sorted(b for b in (path / "banks").glob(f"*/{BANK_FILE}"))
    if len(banks) == 1:
        return banks[0].parent
    if banks:
        names = ", ".join(str(b.parent) for b in banks)
        raise ValueError(f"{path}: a run with several adapter banks; choose one of {names}")
    raise FileNotFoundError(
        f"{path}: no adapter bank here (expected {BANK_FILE}, or a bench run folder with "
        "banks/<method>/)"
    )


def trusted_backbone(
    meta: Mapping[str, Any], folder: str | Path, passed: str | None, allowed: Sequence[str] = ()
) -> str:
    """The backbone spec to load for a bank: the caller's (``passed``), else the one
    ``bank.json`` records if it is built in (no files or hub involved) or in ``allowed``. A
    crafted file must not pick a model folder or hub id to load on its own."""
    from cmrkit.backbones import NAMED

    if passed:
        return passed  # the caller's choice; load_bank then checks its fingerprint
    path = Path(folder) / BANK_FILE
    ident = meta.get("backbone") or {}
    recorded = ident.get("spec") or ident.get("name")
    if not isinstance(recorded, str) or not recorded:
        raise ValueError(f"{path}: records no backbone name; pass --backbone")
    if recorded in NAMED or recorded in allowed:
        return recorded
    raise ValueError(
        f"{path}: records backbone {recorded!r}, which is not built in; pass --backbone "
        f"{recorded} (or --allow-backbone {recorded}) to load it"
    )


def load_bank(
    folder: str | Path, model: nn.Module
) -> tuple[LoRABank, dict[str, Tensor], dict[str, Any]]:
    """Load a bank folder onto ``model`` (injecting the bank if the model has none).

    Returns the bank, the extra tensors and ``bank.json``. A file saved for another backbone,
    or tensors that do not fit the model, raise a ValueError naming the file.
    """
    folder = Path(folder)
    meta = read_bank_meta(folder)
    here = backbone_id(model)
    if any(meta["backbone"].get(k) != here[k] for k in ("name", "fingerprint")):
        raise ValueError(
            f"{folder / BANK_FILE}: saved for backbone {meta['backbone']}, "
            f"but this backbone is {here}"
        )
    has_bank = any(isinstance(m, LoRABankLinear) for m in model.modules())
    bank = LoRABank.from_model(model) if has_bank else inject_lora_bank(model, meta["layers"])
    if sorted(bank.layers) != meta["layers"]:
        raise ValueError(f"{folder / BANK_FILE}: wraps other layers than this model's bank")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (the bank's tensors)")
    state = load_file(str(weights))
    restore_bank(bank, meta["adapters"], state, str(weights))
    extra = {k: v for k, v in state.items() if not k.startswith(ADAPTER_PREFIX)}
    return bank, extra, meta


# --- PEFT ---------------------------------------------------------------------------------------
# PEFT names modules relative to the model it wraps. For a stock library model held inside a
# cmrkit backbone (``HFDualEncoder.model``), those names are the bank's minus the backbone's
# ``stock_model_prefix`` ("model."), so that PEFT on a bare ``CLIPModel`` reads and writes them.
def _strip(name: str, prefix: str) -> str:
    if not name.startswith(prefix):
        raise ValueError(f"layer {name!r} lies outside the stock model ({prefix!r})")
    return name.removeprefix(prefix)


def peft_state_dict(bank: LoRABank, idx: int, module_prefix: str = "") -> dict[str, Tensor]:
    """Adapter ``idx`` under PEFT's saved key names, relative to the stock model."""
    out = {}
    for name, layer in bank.layers.items():
        state, module = layer.adapter_state(idx), _strip(name, module_prefix)
        out[f"base_model.model.{module}.lora_A.weight"] = state["lora_A"]
        out[f"base_model.model.{module}.lora_B.weight"] = state["lora_B"]
    return out


def export_peft(
    bank: LoRABank,
    idx: int,
    folder: str | Path,
    base_model: str | None = None,
    module_prefix: str = "",
) -> Path:
    """Write adapter ``idx`` in PEFT's LoRA layout.

    ``module_prefix`` is where the stock model sits inside the backbone (its
    ``stock_model_prefix``); ``base_model`` is what that stock model loads from (a hub id or a
    folder). ``PeftModel.from_pretrained(CLIPModel.from_pretrained(base_model), folder)`` then
    reproduces the adapted backbone.
    """
    folder = Path(folder)
    config = bank.adapter_config(idx)
    tensors = {
        k: v.cpu().contiguous() for k, v in peft_state_dict(bank, idx, module_prefix).items()
    }
    atomic_write(folder / PEFT_WEIGHTS, lambda p: save_file(tensors, str(p)))
    write_json(
        folder / PEFT_CONFIG,
        {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model,
            "r": int(config["rank"]),
            "lora_alpha": config["alpha"],
            "lora_dropout": config["dropout"],
            # Exact module names: PEFT matches them as dotted suffixes, as inject_lora_bank does.
            "target_modules": sorted(_strip(n, module_prefix) for n in bank.layers),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
        },
    )
    return folder


def import_peft(folder: str | Path, bank: LoRABank, module_prefix: str = "") -> int:
    """Add the PEFT LoRA adapter in ``folder`` to ``bank``; return its index.

    Module names are read relative to the stock model (``module_prefix`` + name is the bank's
    layer), or as the bank's own names (an adapter PEFT made on the cmrkit backbone itself).
    The adapter must cover exactly the bank's layers with one rank and one alpha (PEFT's
    ``rank_pattern`` / ``alpha_pattern``, DoRA and LoRA biases have no equivalent here).
    """
    folder = Path(folder)
    config_path, weights_path = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (expected a PEFT LoRA adapter folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    _check_peft_config(config, config_path)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= rank**0.5  # rsLoRA scales by alpha/sqrt(r); ours is alpha/r
    state = _peft_to_layers(load_file(str(weights_path)), weights_path, bank, module_prefix)
    expected = {f"{n}.{k}" for n in bank.layers for k in ("lora_A", "lora_B")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"{weights_path}: does not match this bank's layers "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'…' if len(extra) > 3 else ''})"
        )
    for name, layer in bank.layers.items():  # check before adding: a bad file leaves no trace
        shapes = {"lora_A": (rank, layer.in_features), "lora_B": (layer.out_features, rank)}
        for key, shape in shapes.items():
            got = tuple(state[f"{name}.{key}"].shape)
            if got != shape:
                raise ValueError(
                    f"{weights_path}: {name}.{key} has shape {got}, this backbone needs {shape}"
                )
    idx = bank.add_adapter(rank, alpha, float(config.get("lora_dropout", 0.0)))
    bank.load_adapter_state_dict(idx, state)
    return idx


def _check_peft_config(config: Mapping[str, Any], path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    unsupported = [
        key
        for key, bad in (
            ("use_dora", bool(config.get("use_dora"))),
            ("rank_pattern", bool(config.get("rank_pattern"))),
            ("alpha_pattern", bool(config.get("alpha_pattern"))),
            ("bias", config.get("bias", "none") != "none"),
            ("lora_bias", bool(config.get("lora_bias"))),
            ("fan_in_fan_out", bool(config.get("fan_in_fan_out"))),
        )
        if bad
    ]
    if unsupported:
        raise ValueError(f"{path}: unsupported PEFT LoRA settings {unsupported}")


def _peft_to_layers(
    state: Mapping[str, Tensor], source: Path, bank: LoRABank, module_prefix: str
) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"{source}: {key!r} is not a LoRA A/B weight")
        module = m.group(1)
        layer = module if module in bank.layers else module_prefix + module
        out[f"{layer}.lora_{m.group(2)}"] = value
    return out
