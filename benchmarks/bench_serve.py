"""Load and fault test of ``cmrkit serve`` on loopback (a benchmark script, not a timed test).

    python benchmarks/bench_serve.py prepare --run3 RUN --run4 RUN --out runs/serve-demo
    python benchmarks/bench_serve.py load --demo runs/serve-demo [--queries 2000 --clients 16]
    python benchmarks/bench_serve.py shots --demo runs/serve-demo --out runs/serve-shots

``prepare``: adapter banks from two finished ``cmrkit bench`` DAR runs (the stream without and
with the last domain) and an index of the cmr-mini joint test gallery built with the first.
``load``: a server on 127.0.0.1 answers mixed text/image queries from concurrent clients while
a domain is added (the second bank) mid-run; every response is checked against the same query
on an offline index of the version it reports. Then a second server is SIGKILLed while it
re-embeds for an update and restarted: it must come back on the last complete version.
Bounded: ``--queries`` requests, a timeout per request and per phase.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from cmrkit.serve.process import free_port, start_server

TOKEN = "bench-token"
K = 10


# --- prepare ------------------------------------------------------------------------------------
def prepare(args) -> None:
    """The DAR banks the two bench runs saved (``RUN/banks/dar/``), copied into the demo folder,
    and an index of the cmr-mini joint test gallery built with the first."""
    from cmrkit.adapters.persistence import resolve_bank_dir
    from cmrkit.cli import main

    out = Path(args.out)
    b3, b4 = out / "bank3", out / "bank4"
    for run, bank in ((args.run3, b3), (args.run4, b4)):
        shutil.copytree(resolve_bank_dir(run), bank, dirs_exist_ok=True)
    print(f"banks: {b3} ({args.run3}), {b4} ({args.run4})")
    build = ["index", "build", "--adapters", str(b3), "--suite", "cmr-mini"]
    code = main([*build, "--out", str(out / "index")])
    assert code == 0, code


# --- a server in a subprocess -----------------------------------------------------------------
def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


# --- offline truth ------------------------------------------------------------------------------
class Offline:
    """The same queries on an index version loaded from disk, with its own encoder."""

    def __init__(self, index_dir: Path):
        from cmrkit.index import GalleryIndex
        from cmrkit.serve.engine import Engine

        state = index_dir.parent / "offline-state"
        self.engine = Engine(index_dir, state)
        self.version = self.engine.snapshot.version
        self.index: GalleryIndex = self.engine.snapshot.index

    def answer(self, query: dict) -> tuple[list[str], list[float]]:
        from PIL import Image

        from cmrkit.serve.engine import Term, parse_text
        from cmrkit.serve.limits import Limits

        if "q" in query:
            terms = parse_text(query["q"], Limits())
        else:
            with Image.open(query["path"]) as im:
                terms = [Term(1.0, image=im.convert("RGB"))]
        result = self.engine.search(terms, K)
        return result.ids, result.scores


def same_answer(got_ids, got_scores, ids, scores) -> bool:
    """Equal ids in order, or (float ties) equal scores with the same set of ids."""
    if got_ids == ids:
        return np.allclose(got_scores, scores, atol=1e-4)
    return np.allclose(got_scores, scores, atol=1e-4) and set(got_ids[:-1]) <= set(ids)


# --- load ---------------------------------------------------------------------------------------
def query_pool(index, n_text: int, n_image: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(index), n_text + n_image, replace=False)
    pool = [{"q": (index.captions[r] or ["photo"])[0][:200]} for r in rows[:n_text]]
    pool += [{"path": index.paths[r]} for r in rows[n_text:]]
    return pool


def one_request(client: httpx.Client, url: str, query: dict) -> dict:
    t0 = time.perf_counter()
    try:
        if "q" in query:
            r = client.get(f"{url}/api/search", params={"q": query["q"], "k": K, "page_size": 10})
        else:
            data = Path(query["path"]).read_bytes()
            r = client.post(
                f"{url}/api/search",
                data={"k": str(K), "page_size": "10"},
                files={"image": ("q.jpg", data)},
            )
        body = r.json() if r.status_code == 200 else {}
        status = r.status_code
    except httpx.HTTPError as e:
        body, status = {"error": str(e)}, 0
    t1 = time.perf_counter()
    return {
        "t0": t0,
        "t1": t1,
        "status": status,
        "version": body.get("version"),
        "ids": body.get("ids"),
        "scores": body.get("scores"),
    }


def run_load(args) -> dict:
    demo = Path(args.demo)
    work = demo / "load"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(demo / "index", work / "index")
    before = Offline(work / "index")
    pool = query_pool(before.index, args.text_queries, args.image_queries)
    expected = {before.version: [before.answer(q) for q in pool]}
    print(f"offline answers of {len(pool)} queries on {before.version}", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(work / "index", port, work / "server.log", token=TOKEN)
    mem_before = rss_mib(proc.pid)
    rng = np.random.default_rng(1)
    plan = rng.integers(0, len(pool), args.queries)
    results: list[dict | None] = [None] * args.queries
    update: dict = {}
    counter = iter(range(args.queries))
    lock = threading.Lock()

    def client_loop():
        with httpx.Client(timeout=60) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                results[i] = {**one_request(client, url, pool[plan[i]]), "query": int(plan[i])}
                if i == int(args.queries * args.update_at) and not update:
                    threading.Thread(target=add_domain, daemon=True).start()

    def add_domain():
        update["t0"] = time.perf_counter()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        job = httpx.post(
            f"{url}/api/admin/domains", json={"bank": str(demo / "bank4")}, headers=auth, timeout=60
        ).json()
        while job.get("state") == "running":
            time.sleep(0.2)
            job = httpx.get(f"{url}/api/admin/jobs/{job['id']}", headers=auth, timeout=60).json()
        update["t1"], update["job"] = time.perf_counter(), job

    t_start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool_exec:
        for _ in range(args.clients):
            pool_exec.submit(client_loop)
    wall = time.perf_counter() - t_start
    deadline = time.time() + 600
    while "t1" not in update and time.time() < deadline:
        time.sleep(0.5)
    mem_after = rss_mib(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)

    after = Offline(work / "index")
    expected[after.version] = [after.answer(q) for q in pool]
    done = [r for r in results if r is not None]
    errors = [r for r in done if r["status"] != 200]
    wrong = [
        r
        for r in done
        if r["status"] == 200
        and (
            r["version"] not in expected
            or not same_answer(r["ids"], r["scores"], *expected[r["version"]][r["query"]])
        )
    ]
    lat = sorted(1000 * (r["t1"] - r["t0"]) for r in done)
    pct = {p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] for p in (50, 95, 99)}
    text_n = sum("q" in pool[r["query"]] for r in done)
    report = {
        "queries": len(done),
        "text": text_n,
        "image": len(done) - text_n,
        "clients": args.clients,
        "wall_s": round(wall, 2),
        "throughput_qps": round(len(done) / wall, 1),
        "p50_ms": round(pct[50], 1),
        "p95_ms": round(pct[95], 1),
        "p99_ms": round(pct[99], 1),
        "mean_ms": round(statistics.fmean(lat), 1),
        "errors": len(errors),
        "wrong_answers": len(wrong),
        "rss_mib_before": round(mem_before[0], 1),
        "rss_mib_after": round(mem_after[0], 1),
        "rss_peak_mib": round(mem_after[1], 1),
        "versions": {v: sum(r["version"] == v for r in done) for v in expected},
        "update": timeline(done, update, t_start, before.version, after.version),
    }
    return report


def timeline(done: list[dict], update: dict, t_start: float, old: str, new: str) -> dict:
    """Queries answered per second and versions seen, around the add-domain job."""
    if "t1" not in update:
        return {"error": "the update did not finish"}
    job = update["job"]
    during = [r for r in done if update["t0"] <= r["t1"] <= update["t1"]]
    seconds = {}
    for r in done:
        s = int(r["t1"] - t_start)
        row = seconds.setdefault(s, {"answered": 0, old: 0, new: 0})
        row["answered"] += 1
        if r["version"] in (old, new):
            row[r["version"]] += 1
    last_old = max((r["t1"] for r in done if r["version"] == old), default=t_start)
    first_new = min((r["t1"] for r in done if r["version"] == new), default=float("nan"))
    return {
        "job": {k: job.get(k) for k in ("state", "done", "total", "result", "message")},
        "started_s": round(update["t0"] - t_start, 2),
        "swapped_s": round(update["t1"] - t_start, 2),
        "time_to_swap_s": round(update["t1"] - update["t0"], 2),
        "answered_during_update": len(during),
        "versions_during_update": sorted({r["version"] for r in during if r["version"]}),
        "last_old_answer_s": round(last_old - t_start, 2),
        "first_new_answer_s": round(first_new - t_start, 2),
        "per_second": seconds,
    }


def kill_during_update(args) -> dict:
    """SIGKILL a server while it re-embeds for an update; the restart serves the last
    complete version and answers like it; the update then runs to the end."""
    demo = Path(args.demo)
    work = demo / "kill"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(demo / "index", work / "index")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    proc = start_server(work / "index", port, work / "server.log", token=TOKEN)
    v_before = httpx.get(f"{url}/health").json()["version"]
    query = {"q": "a dog running on the grass", "k": K}
    answer_before = httpx.get(f"{url}/api/search", params=query, timeout=60).json()["ids"]
    job = httpx.post(
        f"{url}/api/admin/domains", json={"bank": str(demo / "bank4")}, headers=auth, timeout=60
    ).json()
    t0 = time.time()
    while time.time() - t0 < 300:
        job = httpx.get(f"{url}/api/admin/jobs/{job['id']}", headers=auth, timeout=60).json()
        if job["state"] != "running" or job["done"] > 0:
            break
        time.sleep(0.05)
    state_at_kill = {k: job[k] for k in ("state", "done", "total")}
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = sorted(p.name for p in (work / "index").iterdir())
    proc = start_server(work / "index", port, work / "server.log", token=TOKEN)
    health = httpx.get(f"{url}/health").json()
    answer_after = httpx.get(f"{url}/api/search", params=query, timeout=60).json()["ids"]
    job = httpx.post(
        f"{url}/api/admin/domains", json={"bank": str(demo / "bank4")}, headers=auth, timeout=60
    ).json()
    while job["state"] == "running":
        time.sleep(0.3)
        job = httpx.get(f"{url}/api/admin/jobs/{job['id']}", headers=auth, timeout=60).json()
    final = httpx.get(f"{url}/health").json()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return {
        "version_before": v_before,
        "job_at_kill": state_at_kill,
        "index_folder_after_kill": left,
        "restart_version": health["version"],
        "restart_items": health["items"],
        "restart_is_last_complete": health["version"] == v_before,
        "restart_answers_like_before": answer_after == answer_before,
        "update_after_restart": {k: job.get(k) for k in ("state", "result", "message")},
        "final_version": final["version"],
    }


def transcript(args) -> None:
    """A few searches on the joint gallery (server in-process), before and after adding the
    last domain's bank."""
    from fastapi.testclient import TestClient

    from cmrkit.serve.app import create_app
    from cmrkit.serve.engine import Engine

    demo = Path(args.demo)
    work = demo / "transcript"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(demo / "index", work / "index")
    engine = Engine(work / "index", work / "state")
    client = TestClient(create_app(engine))
    for stage in ("before", "after"):
        if stage == "after":
            job = engine.start_domain(demo / "bank4")
            while job.state == "running":
                time.sleep(0.2)
            print(f"\n# add domain {demo / 'bank4'}: {job.state} {job.result or job.message}")
        for q in args.text:
            body = client.get("/api/search", params={"q": q, "k": 5, "page_size": 5}).json()
            route = " + ".join(
                f"{t['modality']} {t['term']!r} -> " + _adapters(t["adapters"])
                for t in body["route"]
            )
            print(f"\n$ GET /api/search?q={q}&k=5   [{body['version']}]  route: {route}")
            for rank, item in enumerate(body["items"], 1):
                print(
                    f"  {rank}. {item['score']:.3f}  {item['id']:<16} "
                    f"[{_adapters(item['adapters'])}]  {item['caption'][:60]}"
                )


def _adapters(adapters: list[dict]) -> str:
    return ", ".join(f"{a['name']}({a['weight']:.2f})" for a in adapters) or "backbone"


def shots(args) -> None:
    """Screenshots of the page on the demo gallery (desktop and phone widths)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = demo / "shots-index"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(demo / "index", work)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(work, port, demo / "shots-server.log", token=TOKEN)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1366,900",
    ):
        options.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = WebDriverWait(driver, 120)
    cards = "#grid .card img"
    loaded = (
        "return [...document.querySelectorAll('#grid .card img')].slice(0, 12)"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    try:
        for width, height, name in ((1366, 900, "desktop"), (390, 844, "phone")):
            driver.set_window_size(width, height)
            driver.get(url)
            box = wait.until(lambda d: d.find_element(By.ID, "q"))
            box.send_keys(args.query, Keys.ENTER)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, cards))
            wait.until(lambda d: d.execute_script(loaded))
            driver.save_screenshot(str(out / f"{name}-results.png"))
            driver.find_elements(By.CSS_SELECTOR, "#grid .card")[0].click()
            wait.until(
                lambda d: d.execute_script(
                    "return document.getElementById('v-img').naturalWidth > 0"
                )
            )
            driver.save_screenshot(str(out / f"{name}-viewer.png"))
            driver.find_element(By.ID, "close").click()
        driver.set_window_size(1366, 900)
        driver.find_element(By.ID, "admin-toggle").click()
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "bank").send_keys(str((demo / "bank4").resolve()))
        driver.find_element(By.ID, "add-domain").click()
        wait.until(
            lambda d: (
                "Re-embedding" in d.find_element(By.ID, "job").text
                or d.find_element(By.ID, "job").text.startswith("Done")
            )
        )
        driver.save_screenshot(str(out / "desktop-admin-progress.png"))
        wait.until(lambda d: d.find_element(By.ID, "job").text.startswith("Done"))
        time.sleep(0.5)
        driver.save_screenshot(str(out / "desktop-admin-done.png"))
        driver.find_element(By.ID, "admin-close").click()
        box = driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys("chest x-ray", Keys.ENTER)
        time.sleep(2)
        wait.until(lambda d: d.execute_script(loaded))
        driver.save_screenshot(str(out / "desktop-results-after-update.png"))
    finally:
        driver.quit()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    for p in sorted(out.glob("*.png")):
        print(p.resolve())


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--run3", required=True)
    a.add_argument("--run4", required=True)
    a.add_argument("--out", required=True)
    b = sub.add_parser("load")
    b.add_argument("--demo", required=True)
    b.add_argument("--queries", type=int, default=2000)
    b.add_argument("--clients", type=int, default=16)
    b.add_argument("--text-queries", type=int, default=60)
    b.add_argument("--image-queries", type=int, default=40)
    b.add_argument("--update-at", type=float, default=0.1, help="add the domain after this share")
    b.add_argument("--out", help="write the report here as JSON")
    c = sub.add_parser("transcript")
    c.add_argument("--demo", required=True)
    c.add_argument("--text", action="append", default=[])
    d = sub.add_parser("shots")
    d.add_argument("--demo", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--query", default="a dog running through the grass")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args)
    elif args.cmd == "load":
        report = run_load(args)
        report["kill_during_update"] = kill_during_update(args)
        text = json.dumps(report, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    elif args.cmd == "transcript":
        transcript(args)
    else:
        shots(args)


if __name__ == "__main__":
    main()
