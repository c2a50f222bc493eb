"""Two gloo processes on the CPU do the job of one process with the concatenated batch."""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from cmrkit import distributed
from cmrkit.backbones import load_backbone
from cmrkit.data.dataset import ImageCaptionDataset
from cmrkit.data.synthetic import generate
from cmrkit.eval.retrieval import evaluate_retrieval
from cmrkit.methods import TaskContext, build_method
from cmrkit.methods.cclip import ckc_loss
from cmrkit.methods.distill import similarity_matrices
from cmrkit.train.distributed import global_batch
from cmrkit.train.loop import TrainConfig, train_task
from cmrkit.train.losses import clip_loss, sigmoid_loss

WORLD = 2
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    # world 1 is the reference: one rank, but the same distributed sampler and data order
    assert distributed.init_from_env(timeout_s=60) == (world > 1)
    assert distributed.world_size() == world
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(fn(*args), f)  # our own results: numpy arrays, tensors, dicts
    distributed.shutdown()
    # About 1 exit in 20 of a spawned child aborted here ("terminate called without an active
    # exception", after shutdown, at interpreter teardown) on this loaded 2-core machine; the
    # results are written, so leave without running C++ static destructors.
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, tmp_path, *args, world=WORLD):
    """Run ``fn(*args)`` in ``world`` gloo processes; the list of what each rank returned."""
    ctx = mp.start_processes(
        _entry,
        args=(world, _free_port(), str(tmp_path), fn, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s")
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(world)]


# --- the gathered contrastive loss --------------------------------------------------------------
def _towers():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(5, 4, bias=False)


def _global_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)


def _distill(name):
    """Mod-X's or DKR's distillation term against an 'old model' whose features are a per-item
    distortion of the new ones (mostly still right, so its rows are the targets)."""
    method = build_method(name, load_backbone("tiny-mini"), from_first_task=True)

    def old_features(x):
        return F.normalize(x.detach() + 0.6 * x.detach().roll(1, dims=1), dim=-1)

    def loss(image, text):
        old = similarity_matrices(old_features(image), old_features(text))
        return method.distill_loss(old, similarity_matrices(image, text))

    return loss


LOSSES = {
    "infonce": lambda a, b: clip_loss(a, b, 7.0),
    "sigmoid": lambda a, b: sigmoid_loss(a, b, 10.0, -3.0),  # SigLIP's
    "ckc": lambda a, b: ckc_loss(a, b, a.detach().flip(1), b.detach() * 2, 0.07),  # C-CLIP's 2N
    "modx": lambda a, b: _distill("modx")(a, b),  # rows summed: scaled by N across ranks
    "dkr": lambda a, b: _distill("dkr")(a, b),  # rectified targets: one-hot at global columns
}


def _loss_and_grads(kind, x, y):
    image_tower, text_tower = _towers()
    image, text = F.normalize(image_tower(x), dim=-1), F.normalize(text_tower(y), dim=-1)
    loss = LOSSES[kind](image, text)
    loss.backward()
    return loss.detach(), [image_tower.weight.grad, text_tower.weight.grad]


def _rank_loss_and_grads(kind):
    x, y = _global_batch()
    lo, hi = distributed.shard_bounds(len(x))
    with global_batch():
        loss, grads = _loss_and_grads(kind, x[lo:hi], y[lo:hi])
    for g in grads:  # what DDP does: the mean of the ranks' gradients
        distributed.all_reduce_sum_(g).div_(distributed.world_size())
    return loss, grads


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_gathered_loss_and_gradients_equal_global_loss(kind, tmp_path):
    ranks = run_ranks(_rank_loss_and_grads, tmp_path, kind)
    loss, grads = _loss_and_grads(kind, *_global_batch())
    # Each rank's loss is over its own rows; their mean is the global loss.
    assert torch.stack([r[0] for r in ranks]).mean() == pytest.approx(float(loss), abs=1e-6)
    assert ranks[0][0] != pytest.approx(float(ranks[1][0]), abs=1e-4)  # really different rows
    for _, grads_r in ranks:
        for g_r, g in zip(grads_r, grads):
            # float summation order only; Mod-X sums rows, so its gradients reach ~10
            torch.testing.assert_close(g_r, g, atol=1e-6, rtol=0 if kind == "infonce" else 1e-6)
    # Without the gradient-carrying gather the gradient would be 1/W of it: the test can tell.
    assert grads[0].abs().max() > 1e-3


def test_without_process_group_the_loss_is_local():
    x, y = _global_batch()
    with global_batch():
        loss, _ = _loss_and_grads("infonce", x, y)
    assert float(loss) == pytest.approx(float(_loss_and_grads("infonce", x, y)[0]), abs=0)


# --- ragged gathers -----------------------------------------------------------------------------
def _gather_ragged_parts():
    r = distributed.rank()
    mine = torch.arange(6.0).reshape(3, 2)[:0] if r == 0 else torch.arange(6.0).reshape(3, 2)
    routes = torch.tensor([[5]]) if r == 0 else torch.tensor([[1, 2], [3, 4]])  # widths differ
    return (
        distributed.gather_ragged(mine),
        distributed.shard_map(
            list(range(5)), lambda items: torch.tensor(items, dtype=torch.float32)[:, None] * 10
        ),
        distributed.gather_ragged(routes, fill=-1),
    )


def test_gather_ragged_and_shard_map(tmp_path):
    for ragged, mapped, routes in run_ranks(_gather_ragged_parts, tmp_path):
        torch.testing.assert_close(ragged, torch.arange(6.0).reshape(3, 2))
        torch.testing.assert_close(mapped, torch.arange(5.0)[:, None] * 10)
        assert routes.tolist() == [[5, -1], [1, 2], [3, 4]]


# --- one DAR task: N = 2 at batch b equals N = 1 at batch 2b --------------------------------------
def _ds(style, n, seed):
    rows = generate(n, style, seed=seed, size=32)
    return ImageCaptionDataset(style, *map(list, zip(*rows, strict=True)))


def _dar_task(batch_size, grad_accum=1):
    """One DAR task (no dropout: its masks are drawn per rank), then its routed evaluation."""
    train, test = _ds("flat", 16, seed=0), _ds("flat", 10, seed=5)
    torch.manual_seed(0)  # the adapter's initialisation, as bench seeds each task
    backbone = load_backbone("tiny-mini")
    for module in backbone.modules():  # the frozen backbone's dropout is drawn per rank too
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    method = build_method("dar", backbone, rank=2, alpha=4.0, dropout=0.0)
    cfg = TrainConfig(
        epochs=2,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=1e-2,
        warmup_epochs=0,
        progress=False,
    )
    ctx = TaskContext(0, train.name, train, cfg, [train.name])
    method.begin_task(ctx)
    stats = train_task(method, train, cfg, 0)
    method.end_task(ctx)
    recall, emb = evaluate_retrieval(method.encoder(), test, batch_size=4, progress=False)
    return stats, method.state_dict(), recall, (emb.images, emb.texts)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_dar_task_on_two_ranks_equals_one_rank_with_double_batch(grad_accum, tmp_path):
    b = 4 // grad_accum  # per rank and micro-step; a step sees 8 items either way
    ref = run_ranks(_dar_task, tmp_path, 2 * b, grad_accum, world=1)
    ((ref_stats, ref_state, ref_recall, ref_emb),) = ref
    ranks = run_ranks(_dar_task, tmp_path, b, grad_accum)
    assert ref_stats["steps"] == 4  # 16 items, 2 epochs of 2 steps of 8 items
    for stats, state, recall, emb in ranks:
        assert stats["steps"] == ref_stats["steps"]
        # The logged loss is the mean over ranks of local losses = the global batch's loss.
        assert stats["loss"] == pytest.approx(ref_stats["loss"], abs=1e-5)
        # Adapters and prototypes: the gradients agree up to float summation order (~1e-7
        # relative), but Adam divides by sqrt(v), so where a gradient is near zero that rounding
        # moves a weight by up to ~1e-3 of a step (lr 1e-2): measured 9.3e-6 after 4 steps.
        # 5e-5 is 0.5 % of one step, far below any real difference (a wrong batch: ~0.3).
        assert state.keys() == ref_state.keys()
        for key, ref in ref_state.items():
            torch.testing.assert_close(state[key], ref, atol=5e-5, rtol=0, msg=key)
        # Sharded evaluation embedding gathered back in order; recall identical.
        torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=0)
        assert recall == ref_recall
    adapter = [k for k in ref_state if "lora_B" in k]
    assert adapter and max(ref_state[k].abs().max() for k in adapter) > 1e-3  # it did train


def _ewc_fisher():
    train = _ds("outline", 10, seed=3)
    torch.manual_seed(0)
    method = build_method("ewc", load_backbone("tiny-mini"), fisher_batches=3)
    cfg = TrainConfig(batch_size=4, progress=False)
    return method.fisher(TaskContext(0, train.name, train, cfg, [train.name]))


def test_ewc_fisher_on_two_ranks_equals_one_process(tmp_path):
    ref = _ewc_fisher()  # batches of 4, 4 and 2 items; rank 0 takes the 1st and 3rd
    assert max(float(f.abs().max()) for f in ref.values()) > 0
    for fisher in run_ranks(_ewc_fisher, tmp_path):
        assert fisher.keys() == ref.keys()
        for name, f in ref.items():
            # float summation order only: measured 1.7e-7 of each tensor's largest entry
            scale = float(f.abs().max())
            torch.testing.assert_close(fisher[name], f, atol=1e-6 * scale, rtol=0, msg=name)


# --- bench under torchrun: rank 0 writes, --resume with the same N ----------------------------
BENCH_SUITE = """
name: tiny
order: given
tasks:
  - {name: flat, train: {synthetic: {style: flat, n: 16, seed: 1, size: 32}},
     test: {synthetic: {style: flat, n: 8, seed: 11, size: 32}}}
  - {name: pixel, train: {synthetic: {style: pixel, n: 16, seed: 2, size: 32}},
     test: {synthetic: {style: pixel, n: 8, seed: 12, size: 32}}}
probes:
  classification:
    - {name: shapes, test: {synthetic: {style: flat, n: 8, seed: 21, size: 32}}}
"""


def _json(obj):
    return json.loads(json.dumps(obj))  # tuples as lists, as a resumed record reads them


class _Killed(Exception):
    pass


def _bench(suite, out, crash_in_task=None, resume=False):
    import cmrkit.bench as bench_module

    writes = []
    real_train, real_save = bench_module.train_task, bench_module.save_results

    def train(method, ds, cfg, task_index):
        if task_index == crash_in_task:
            raise _Killed
        return real_train(method, ds, cfg, task_index)

    def save(path, results):
        writes.append(str(path))
        real_save(path, results)

    bench_module.train_task, bench_module.save_results = train, save
    cfg = bench_module.BenchConfig(
        suite=suite,
        methods=["dar"],
        out=out,
        backbone="tiny-mini",
        train_overrides={"epochs": 1, "batch_size": 4, "lr": 1e-2, "progress": False},
        method_options={"dar": {"rank": 2}},
        eval_batch_size=4,
        templates=["a photo of a {}."],
        device="cpu",
        resume=resume,
    )
    try:
        return bench_module.run_bench(cfg)["methods"]["dar"], writes
    except _Killed:
        return None, writes
    finally:
        bench_module.train_task, bench_module.save_results = real_train, real_save


def _bench_killed_then_resumed(suite, tmp):
    whole, writes = _bench(suite, f"{tmp}/whole")
    assert _bench(suite, f"{tmp}/killed", crash_in_task=1)[0] is None
    resumed, _ = _bench(suite, f"{tmp}/killed", resume=True)
    return whole, resumed, writes


def test_bench_on_two_ranks_resumes_and_only_rank_0_writes(tmp_path):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(BENCH_SUITE)
    (whole0, resumed0, writes0), (whole1, resumed1, writes1) = run_ranks(
        _bench_killed_then_resumed, tmp_path, str(suite), str(tmp_path)
    )
    assert writes0 and not writes1  # rank 1 never wrote results.json
    assert whole0["recall"] == whole1["recall"]  # every rank computed the same numbers
    for key in ("recall", "recall_joint", "metrics", "zeroshot_cls"):
        assert _json(resumed0[key]) == _json(whole0[key]), key
    assert [s["loss"] for s in resumed0["train_stats"]] == [
        s["loss"] for s in whole0["train_stats"]
    ]
    assert not list(tmp_path.rglob("*.tmp"))


def _cli_bench_stdout(suite, out):
    import contextlib
    import io

    from cmrkit.cli import main

    argv = ["bench", "--suite", suite, "--methods", "zeroshot", "--out", out]
    argv += ["--backbone", "tiny-mini", "--quick", "--no-progress", "--device", "cpu"]
    with contextlib.redirect_stdout(io.StringIO()) as text:
        code = main(argv)
    return code, text.getvalue()


def test_bench_under_torchrun_reports_once_from_rank_0(tmp_path):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(BENCH_SUITE)
    (code0, out0), (code1, out1) = run_ranks(
        _cli_bench_stdout, tmp_path, str(suite), str(tmp_path / "run")
    )
    assert code0 == code1 == 0
    assert "wrote" in out0 and "zeroshot: final avg R@1" in out0
    assert out1 == ""


# --- the gallery index: sharded build and update ------------------------------------------------
def _write_gallery(root, n=24):
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        pixels = np.clip(
            rng.integers(0, 255, 3) * (i % 3 == 0) + rng.normal(0, 60, (32, 32, 3)), 0, 255
        )
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "captions": [f"item {i}"], "label": None})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _index_build_and_update(folder):
    """Build with 2 adapters, then update to 3 (test_index's routed encoder on a real bank)."""
    import test_index as ti

    from cmrkit.adapters import inject_lora_bank
    from cmrkit.data.dataset import load_imagefolder
    from cmrkit.index import GalleryIndex

    ds = load_imagefolder(folder)
    torch.manual_seed(0)
    backbone = load_backbone("tiny-clip")
    bank = inject_lora_bank(backbone, backbone.lora_targets)
    for seed in (1, 2, 3):
        ti._random_adapter(bank, seed)
    pixels = torch.stack([backbone.image_transform(ds.load_image(i)) for i in range(len(ds))])
    with torch.no_grad(), bank.disabled():
        feats = backbone.encode_image(pixels)
    centre = feats.mean(0)
    groups = [range(0, 8), range(8, 16), range(16, 20)]
    protos = torch.stack([F.normalize((feats[list(g)] - centre).mean(0), dim=0) for g in groups])
    index = GalleryIndex(backbone.embed_dim, use_gpu=False)
    built = ti.FakeRouted(backbone, bank, protos[:2], centre)
    index.add_dataset(built, ds, batch_size=5)
    after_build = (index.embeddings.copy(), index.route_indices.copy(), index.features.copy())
    updated = ti.FakeRouted(backbone, bank, protos, centre)
    stats = index.update(updated, batch_size=3)
    queries = np.concatenate([index.embeddings[::5], np.eye(index.dim, dtype="f4")[:3]])
    return {
        "built": after_build,
        "updated": (index.embeddings, index.route_indices, index.route_weights),
        "ids": index.ids,
        "top10": index.search(queries, k=10)[0],
        "reembedded": stats.reembedded,
        "embedded_here": (built.routed_items, updated.routed_items),
    }


def test_sharded_index_build_and_update_equal_one_process(tmp_path):
    (tmp_path / "g").mkdir()
    _write_gallery(tmp_path / "g")
    ref = _index_build_and_update(tmp_path / "g")
    assert 0 < ref["reembedded"] < 24
    ranks = run_ranks(_index_build_and_update, tmp_path, tmp_path / "g")
    for got in ranks:
        for a, b in zip(got["built"] + got["updated"], ref["built"] + ref["updated"]):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert got["ids"] == ref["ids"] and got["top10"] == ref["top10"]
        assert got["reembedded"] == ref["reembedded"]
    # each rank embedded its half: 12 of 24 at build, half of the routed-changed items at update
    assert [r["embedded_here"][0] for r in ranks] == [12, 12]
    assert sum(r["embedded_here"][1] for r in ranks) == ref["reembedded"]


# --- import direction (DESIGN.md: arrows point one way) -----------------------------------------
def _imported_modules(path, package):
    """Every module a source file imports (relative imports resolved against ``package``)."""
    import ast

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(base) if node.level else ""
            yield ".".join(filter(None, [module, node.module or ""]))


def test_layers_below_train_never_import_train_or_methods():
    import cmrkit

    root = os.path.dirname(cmrkit.__file__)
    from pathlib import Path

    low = ["backbones", "adapters", "merging", "routing", "data", "eval", "index"]
    files = [p for part in low for p in sorted((Path(root) / part).rglob("*.py"))]
    files.append(Path(root) / "distributed.py")
    assert len(files) > 20
    offending = []
    for path in files:
        package = ".".join(["cmrkit", *path.relative_to(root).parent.parts])
        for module in _imported_modules(path, package):
            if module.startswith(("cmrkit.train", "cmrkit.methods")):
                offending.append(f"{path.relative_to(root)}: {module}")
    assert offending == []
    # the neutral module stands on torch alone
    neutral = set(_imported_modules(Path(root) / "distributed.py", "cmrkit"))
    assert not [m for m in neutral if m.startswith("cmrkit")]


def test_a_plain_process_joins_no_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert distributed.init_from_env() is False
    assert not distributed.is_active() and distributed.world_size() == 1


# --- cmrkit pretrain under torchrun -------------------------------------------------------------
def _pretrain(root, out, batch_size):
    from safetensors.torch import load_file

    from cmrkit.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        data_root=str(root),
        out=str(out),
        steps=3,
        batch_size=batch_size,  # per process
        lr=2e-3,
        warmup_steps=1,
        synthetic_per_style=2,
        base_items_per_source=6,
        threads=1,
    )
    info = pretrain(cfg)
    written = load_file(str(out)) if distributed.is_main() else None
    return info, written


def _cmr_base():
    from cmrkit.data.suites import default_data_root

    root = default_data_root()
    if root is None or not (root / "cmr-base").is_dir():
        pytest.skip("no cmr-base")
    return root


def _pretrain_local_batch_norm(root, out, batch_size):
    """The negative control: each rank's BatchNorm sees only its own batch."""
    import cmrkit.train.distributed as ddp

    ddp.global_batch_norm = lambda module: module
    return _pretrain(root, out, batch_size)


def _relative_difference(state, ref, initial) -> float:
    """|state - ref| / |ref - initial| over every float tensor: the weights' disagreement as a
    share of what training moved them."""
    keys = [k for k in ref if ref[k].is_floating_point()]
    diff = sum(float((state[k].double() - ref[k].double()).pow(2).sum()) for k in keys)
    moved = sum(float((ref[k].double() - initial[k].double()).pow(2).sum()) for k in keys)
    return (diff / moved) ** 0.5


def test_pretrain_on_two_ranks_equals_one_process_with_double_batch(tmp_path):
    root = _cmr_base()
    ref_info, ref_state = _pretrain(root, tmp_path / "one.safetensors", 8)  # plain, no group
    ranks = run_ranks(_pretrain, tmp_path, root, tmp_path / "two.safetensors", 4)
    (info0, state0), (info1, state1) = ranks
    assert state1 is None and info1["sha256"] is None  # rank 0 alone wrote
    assert info0["processes"] == 2 and json.loads((tmp_path / "two.json").read_text())["sha256"]
    for info in (info0, info1):  # the logged loss: the global batch's (mean over ranks)
        assert info["images"] == ref_info["images"] == 2 * 6 + 5 * 2
        assert info["final_loss"] == pytest.approx(ref_info["final_loss"], abs=1e-5)
    # Same data, same global batches, gradients equal up to float summation order (the gathered
    # loss test: 1e-6), but AdamW divides by sqrt(v): where a gradient is near zero (k_proj's
    # bias has none in theory) that rounding flips a whole step of lr. Measured over the whole
    # tower: 9.4e-5 of the update (worst tensor 1.7e-4, BatchNorm running statistics 4e-6 of
    # theirs). Each rank's BatchNorm on its own 4 images instead of the global 8: 0.47.
    assert state0.keys() == ref_state.keys()
    initial = _initial_vision()
    assert _relative_difference(state0, ref_state, initial) < 1e-3
    (_, local), _ = run_ranks(
        _pretrain_local_batch_norm, tmp_path, root, tmp_path / "local.safetensors", 4
    )
    assert _relative_difference(local, ref_state, initial) > 0.05  # the test can tell


def _initial_vision():
    from cmrkit.backbones.embedded import VISION_CONFIG, MiniDualEncoder, minilm_text_model
    from cmrkit.utils import seed_everything

    seed_everything(0)
    return MiniDualEncoder(minilm_text_model(), VISION_CONFIG).image_state_dict()
