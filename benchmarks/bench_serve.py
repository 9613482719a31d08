"""`iumad serve` under load, on loopback: throughput and latency of single and batch requests with both
modalities, the same stream while a new version is promoted mid-run, and the in-process baseline.

    python benchmarks/bench_serve.py [--work DIR] [--config configs/fast-cpu.yaml] [--requests 120]
                                     [--clients 4] [--batch 16] [--batches 8] [--max-seconds 60]
                                     [--workers 1] [--out benchmarks/results/serve.json]

Builds a demo-like store in --work (the synthetic set, its classes learned one at a time, as `iumad
demo` does; a store already there with two versions or more is reused), starts a real `iumad serve`
subprocess on a free 127.0.0.1 port and measures, from an httpx client in this process:

- single: `/v1/predict` with rgb + xyz, one client in sequence, then --clients clients at once;
- batch: `/v1/predict/batch` with --batch samples per request, each request followed by
- baseline: one `predict_records` pass in this process over the same samples, the model loaded as the
  server loads it (no feature cache), while the server idles; alternating the two gives both the same
  machine load. `batch_ratio` = HTTP batch samples/s over baseline samples/s (issue #18: >= 0.90);
  `batch_ratio_of_medians` the same from the median round of each (robust to other work's bursts);
- hot swap: --clients clients stream single requests while the production alias is rolled back to the
  previous version (`iumad rollback`) a third of the way in: failed requests (must be 0), the versions
  each client saw in order (must change exactly once, old to new: a client's requests follow one
  another; across clients, a request in flight at the swap finishes on the old model and may complete
  after another client's first answer from the new one, so the completion order of all responses is
  reported but not checked), and whether every response's score is the score of the version it names
  on that sample (computed in process for both versions beforehand). The alias is rolled forward
  again afterwards, so a reused store starts each run in the same state.

The server runs with its defaults (`--poll 2`). Bounded: each phase sends a fixed number of requests
and stops early at its share of --max-seconds; nothing leaves loopback. The 1-minute load average at
start and end is recorded: other work on the machine skews every number here. Writes
benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit, machine  # noqa: E402

from iumad.continual.demo import run_demo
from iumad.continual.versions import rollback
from iumad.data import find_classes
from iumad.data.sample import SampleRecord
from iumad.progress import StderrProgress
from iumad.serve.holder import Served, load_served
from iumad.store import repository as repo
from iumad.store.db import Store
from iumad.store.models import ModelVersion, Step

ROOT = Path(__file__).resolve().parents[1]
SHARES = {"single_sequential": 0.15, "single_concurrent": 0.15, "batch": 0.35, "hot_swap": 0.35}
READY_TIMEOUT_S = 300.0  # model load on a busy machine; the acceptance target (15 s) is reported, not enforced
SCORE_TOL = 1e-5  # relative (scores of the default model run to tens): float noise of the thread pool, no more


def close(a: float, b: float) -> bool:
    return abs(a - b) <= SCORE_TOL * max(1.0, abs(b))


# ---------------------------------------------------------------------------------------------- the store


def demo_store(work: Path, config: Path, progress: StderrProgress) -> tuple[Path, Path, bool]:
    """(data, store root, reused): the store under `work`, built like `iumad demo` (2 classes, smaller
    splits) unless one with two model versions or more is already there."""
    data, root = work / "synth", work / "store"
    if (root / "iumad.sqlite").is_file():
        with Store.open(root, create=False) as store, store.session() as s:
            if len(s.query(ModelVersion).all()) >= 2 and repo.get_production(s) is not None:
                return data, root, True
    run_demo(work, n_classes=2, n_train=16, n_val=8, n_test=16, config=config, progress=progress)
    return data, root, False


def test_samples(data: Path, n: int) -> list[SampleRecord]:
    """`n` test samples with both modalities, taken in turn from every class (good and defective)."""
    per_class = [[r for r in src.records("test") if r.rgb is not None and r.geometry is not None]
                 for src in find_classes(data)]
    out: list[SampleRecord] = []
    for i in range(max(map(len, per_class))):
        out += [recs[i] for recs in per_class if i < len(recs)]
    if len(out) < n:
        raise SystemExit(f"{data}: only {len(out)} test samples with rgb and xyz; use --batch {len(out)} or less")
    return out[:n]


# ---------------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(root: Path, port: int, workers: int, log: Path) -> Iterator[float]:
    """A real `iumad serve` process on 127.0.0.1:`port`; yields seconds from start to the first 200 /readyz."""
    env = {k: v for k, v in os.environ.items() if k not in ("IUMAD_SERVE_TOKEN", "PROMETHEUS_MULTIPROC_DIR")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "iumad", "serve", "--store", str(root), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", str(workers)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    start = time.perf_counter()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"iumad serve exited with {proc.returncode}; see {log}")
                if time.perf_counter() - start > READY_TIMEOUT_S:
                    raise SystemExit(f"iumad serve not ready after {READY_TIMEOUT_S:.0f} s; see {log}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        yield time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------- requests


Payload = list[tuple[str, tuple[str, bytes, str]]]


def single_payload(rec: SampleRecord) -> Payload:
    return [("rgb", ("part.png", rec.rgb.read_bytes(), "image/png")),
            ("xyz", ("part.tiff", rec.geometry.read_bytes(), "image/tiff"))]


def batch_payload(records: list[SampleRecord]) -> Payload:
    out: Payload = []
    for i, rec in enumerate(records):
        out += [(f"rgb.{i}", ("part.png", rec.rgb.read_bytes(), "image/png")),
                (f"xyz.{i}", ("part.tiff", rec.geometry.read_bytes(), "image/tiff"))]
    return out


def stats(latencies: list[float], wall: float, items: int, failures: list[str], wanted: int) -> dict[str, Any]:
    """Throughput and latency percentiles (ms) of one phase; `items` counts samples scored."""
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(0)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 2) if lat.size else None
    return {"requests": len(latencies) + len(failures), "requests_wanted": wanted, "stopped_early":
            len(latencies) + len(failures) < wanted, "failed": len(failures), "failures": failures[:5],
            "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3) if wall else None,
            "samples_per_s": round(items / wall, 3) if wall else None,
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "mean": round(float(lat.mean()), 2)
                           if lat.size else None, "max": round(float(lat.max()), 2) if lat.size else None}}


def run_clients(url: str, clients: int, total: int, budget_s: float, send: Callable[[httpx.Client, int], httpx.Response],
                on_response: Callable[[int, int, dict[str, Any]], None] | None = None,
                until: Callable[[], bool] | None = None) -> tuple[list[float], list[str], float]:
    """`clients` threads share `total` requests (request k sends `send(client, k)`), each on its own
    connection, until all are sent or `budget_s` has passed (with `until`: also until it says so).
    Returns (latencies of the 200s, failures, wall seconds)."""
    lock, counter = threading.Lock(), [0]
    latencies: list[float] = []
    failures: list[str] = []
    start = time.perf_counter()
    deadline = start + budget_s

    def worker(cid: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.perf_counter() < deadline:
                with lock:
                    k = counter[0]
                    if k >= total and (until is None or until()):
                        return
                    counter[0] += 1
                t0 = time.perf_counter()
                try:
                    r = send(client, k)
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        if on_response is not None:
                            on_response(cid, k, r.json())
                    else:
                        failures.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- phases


def batch_vs_baseline(url: str, payload: Payload, served: Served, records: list[SampleRecord], rounds: int,
                      budget_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Alternate one `/v1/predict/batch` request and one in-process `predict_records` pass over the same
    samples (the model loaded as the server loads it: no feature cache), so both see the same machine
    load; the server idles while the baseline runs. Returns (batch stats, baseline)."""
    det = served.detector
    det.predict_records(records)  # warm-up, as the server had its warm-up request
    http_lat: list[float] = []
    server_ms: list[float] = []
    base_s: list[float] = []
    failures: list[str] = []
    deadline = time.perf_counter() + budget_s
    with httpx.Client(base_url=url, timeout=300) as client:
        while len(http_lat) + len(failures) < rounds and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                r = client.post("/v1/predict/batch", files=payload)
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                failures.append(f"{r.status_code}: {r.text[:200]}")
                continue
            http_lat.append(dt)
            server_ms.append(r.json()["latency_ms"])
            t0 = time.perf_counter()
            det.predict_records(records)
            base_s.append(time.perf_counter() - t0)
    http_wall = sum(http_lat)
    batch = stats(http_lat, http_wall, len(http_lat) * len(records), failures, rounds) | {
        "batch_size": len(records), "server_latency_ms_median": round(float(np.median(server_ms)), 2)
        if server_ms else None}
    base = {"reps": len(base_s), "samples": len(records), "wall_s": round(sum(base_s), 3),
            "samples_per_s": round(len(base_s) * len(records) / sum(base_s), 3) if base_s else None,
            "median_ms": round(float(np.median(base_s)) * 1000, 2) if base_s else None}
    return batch, base


def expected_scores(root: Path, versions: list[int], records: list[SampleRecord]) -> dict[int, list[float]]:
    """Each version's score of each sample, in process: what a response naming that version must say."""
    out = {}
    with Store.open(root, create=False) as store:
        for v in versions:
            with store.session() as s:
                version = s.get(ModelVersion, v)
                s.expunge(version)
            det = load_served(store, version).detector
            out[v] = [det.predict_records([r])[0].score for r in records]  # one at a time, as /v1/predict
    return out


def hot_swap(url: str, root: Path, records: list[SampleRecord], payloads: list[Payload], clients: int, total: int,
             budget_s: float, want: dict[int, list[float]], before: int, after: int) -> dict[str, Any]:
    """Stream single requests from `clients` clients; roll production back from `before` to `after` a
    third of the way in; check failures, version order and that each score is its named version's."""
    seen: list[list[int]] = [[] for _ in range(clients)]
    order: list[int] = []
    mismatches: list[str] = []
    unnamed = [0]
    swap: dict[str, Any] = {}

    def on_response(cid: int, k: int, body: dict[str, Any]) -> None:
        version = body.get("model_version")
        if not isinstance(version, int) or version not in want:
            unnamed[0] += 1
            return
        seen[cid].append(version)
        order.append(version)
        expected = want[version][k % len(records)]
        if not close(body["score"], expected):
            mismatches.append(f"request {k}: version {version} scored {body['score']:.6f}, that version gives "
                              f"{expected:.6f}")
        if len(order) == max(3 * clients, total // 3) and not swap:
            swap["started"] = True
            threading.Thread(target=promote, daemon=True).start()

    def promote() -> None:
        t0 = time.perf_counter()
        with Store.open(root, create=False) as store:
            swap["rolled_back_to"] = rollback(store, to=after)["to_version"]
        swap["rollback_s"] = round(time.perf_counter() - t0, 3)

    def enough_after_swap() -> bool:  # every client has seen the new version twice (or the budget ends it)
        return all(s.count(after) >= 2 for s in seen)

    def send(client: httpx.Client, k: int) -> httpx.Response:
        return client.post("/v1/predict", files=payloads[k % len(payloads)])

    lat, failures, wall = run_clients(url, clients, total, budget_s, send, on_response, until=enough_after_swap)
    collapsed = [v for i, v in enumerate(order) if i == 0 or order[i - 1] != v]
    changes = [sum(a != b for a, b in zip(s, s[1:])) for s in seen]
    result = stats(lat, wall, len(lat), failures, total)
    result |= {"clients": clients, "version_before": before, "version_after": after,
               "rollback": swap, "versions_in_completion_order": collapsed,
               "versions_per_client": [[v for i, v in enumerate(s) if i == 0 or s[i - 1] != v] for s in seen],
               "changes_per_client": changes, "first_last_per_client": [[s[0], s[-1]] if s else [] for s in seen],
               "responses_without_a_known_version": unnamed[0], "score_mismatches": len(mismatches),
               "score_mismatch_examples": mismatches[:5],
               "samples_where_versions_differ": sum(not close(a, b) for a, b in zip(want[before], want[after]))}
    result["ok"] = (not failures and not unnamed[0] and not mismatches and all(c == 1 for c in changes)
                    and all(s and s[0] == before and s[-1] == after for s in seen))
    return result


# ---------------------------------------------------------------------------------------------- main


def rel(path: Path) -> str:
    """`path` relative to the repository when it is inside it (results name files as the README does)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for the synthetic set and store (reused)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "fast-cpu.yaml")
    ap.add_argument("--requests", type=int, default=120, help="single requests per phase")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients")
    ap.add_argument("--batch", type=int, default=16, help="samples per batch request (and baseline)")
    ap.add_argument("--batches", type=int, default=8, help="batch requests (each followed by a baseline pass)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="cap on the time spent sending requests")
    ap.add_argument("--workers", type=int, default=1, help="iumad serve --workers")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = ap.parse_args(argv)
    if not 1 <= args.batch <= 64:
        raise SystemExit("--batch must be in 1..64 (the server's batch limit)")
    with tempfile.TemporaryDirectory(prefix="iumad-bench-serve-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with StderrProgress() as progress:
            data, root, reused = demo_store(work, args.config, progress)
        records = test_samples(data, args.batch)
        with Store.open(root, create=False) as store, store.session() as s:
            prod = repo.get_production(s)
            made_by = s.get(Step, prod.step_id) if prod.step_id else None
            before, after = prod.id, (made_by.parent_version_id if made_by else None)
            if after is None:
                after = max(v.id for v in s.query(ModelVersion).all() if v.id != before and v.removed_at is None)
            s.expunge(prod)
            served = load_served(store, prod)
        want = expected_scores(root, [before, after], records)
        single = [single_payload(r) for r in records]
        batch = batch_payload(records)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        result: dict[str, Any] = {"benchmark": "serve", "commit": git_commit(), "machine": machine(),
                                  "config": rel(args.config), "config_hash": served.detector.config.hash(),
                                  "command": "python benchmarks/bench_serve.py " + " ".join(argv or sys.argv[1:]),
                                  "store": {"reused": reused, "classes": served.detector.class_names,
                                            "production": before},
                                  "samples": len(records), "image_size": list(Image.open(records[0].rgb).size),
                                  "workers": args.workers, "clients": args.clients, "max_seconds": args.max_seconds,
                                  "load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
        try:
            with server(root, port, args.workers, work / "serve.log") as ready_s:
                result["ready_s"] = round(ready_s, 2)
                with httpx.Client(base_url=url, timeout=120) as c:  # warm-up: first request pays lazy set-up
                    assert c.post("/v1/predict", files=single[0]).status_code == 200
                    assert c.post("/v1/predict/batch", files=batch).status_code == 200
                budget = {k: v * args.max_seconds for k, v in SHARES.items()}

                def send_single(client: httpx.Client, k: int) -> httpx.Response:
                    return client.post("/v1/predict", files=single[k % len(single)])

                print("single, sequential", file=sys.stderr, flush=True)
                lat, fail, wall = run_clients(url, 1, args.requests, budget["single_sequential"], send_single)
                result["single_sequential"] = stats(lat, wall, len(lat), fail, args.requests)
                print("single, concurrent", file=sys.stderr, flush=True)
                lat, fail, wall = run_clients(url, args.clients, args.requests, budget["single_concurrent"], send_single)
                result["single_concurrent"] = stats(lat, wall, len(lat), fail, args.requests) | {"clients": args.clients}
                print("batch and predict_records in process, alternating", file=sys.stderr, flush=True)
                result["batch"], result["baseline_predict_records"] = batch_vs_baseline(
                    url, batch, served, records, args.batches, budget["batch"])
                base = result["baseline_predict_records"]["samples_per_s"]
                result["batch_ratio"] = round(result["batch"]["samples_per_s"] / base, 3) if base else None
                # the same ratio from the median round of each: what it is without the rounds another
                # process on the machine slowed down (the throughput ratio above is the measure)
                http_ms = result["batch"]["latency_ms"]["p50"]
                base_ms = result["baseline_predict_records"]["median_ms"]
                result["batch_ratio_of_medians"] = round(base_ms / http_ms, 3) if http_ms and base_ms else None
                result["single_sequential_ratio"] = round(result["single_sequential"]["samples_per_s"] / base, 3)
                print("hot swap", file=sys.stderr, flush=True)
                result["hot_swap"] = hot_swap(url, root, records, single, args.clients, args.requests,
                                              budget["hot_swap"], want, before, after)
        finally:
            with Store.open(root, create=False) as store, store.session() as s:
                current = repo.get_production(s).id
            if current != before:  # leave a reused store as it was found
                with Store.open(root, create=False) as store:
                    rollback(store, to=before)
    result["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)  # other work on the machine skews the numbers
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: result[k] for k in ("ready_s", "batch_ratio", "batch_ratio_of_medians")} | {
        "single_p99_ms": result["single_sequential"]["latency_ms"]["p99"],
        "hot_swap_ok": result["hot_swap"]["ok"], "hot_swap_failed": result["hot_swap"]["failed"]}
    print(json.dumps(summary))
    return 0 if result["hot_swap"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
