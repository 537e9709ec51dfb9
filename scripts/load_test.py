"""Load test of the HTTP service and ONNX Runtime vs torch eager latency (a script, not a test).

    python scripts/load_test.py --model outputs/scratch/demo/export/model --clients 8 --requests 400 --seconds 60

Starts ``python -m lib.serve --model <export>`` on a free 127.0.0.1 port (or uses ``--url`` of a running
service), then N concurrent clients POST the same real file to ``/predict`` until ``--requests`` are done or
``--seconds`` have passed (both bounded), and prints throughput and p50/p95/p99 latency. Then it times the
exported ONNX graph against the torch eager fold ensemble it came from, at batch 1 and one thread each
(the target is ONNX >= 1.3x faster). Numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_CLIENTS = 64
MAX_REQUESTS = 20_000
MAX_SECONDS = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """The real service as a child process on loopback; returns it and its URL once /health answers."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lib.serve", "--model", str(model), "--port", str(port),
                             "--threads", str(threads)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("model_loaded"):
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("server did not come up within 120 s")


def run_load(url: str, payload: bytes, clients: int, requests: int, seconds: float, endpoint: str = "/predict",
             warmup: int = 3) -> dict:
    """``clients`` threads share a budget of ``requests`` uploads and a deadline of ``seconds``."""
    import httpx

    with httpx.Client(timeout=60) as c:  # warm the model up (first ONNX runs are slower)
        for _ in range(warmup):
            c.post(url + endpoint, files={"file": ("upload", payload)}).raise_for_status()
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < deadline:
                with lock:
                    if issued[0] >= requests:
                        return
                    issued[0] += 1
                t = time.perf_counter()
                try:
                    r = c.post(url + endpoint, files={"file": ("upload", payload)})
                    code = r.status_code
                except httpx.HTTPError as exc:
                    code = -1
                    errors.append(type(exc).__name__)
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == 200:
                        latencies.append(ms)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"clients": clients, "requests_ok": len(latencies), "statuses": statuses, "errors": errors[:5],
            "wall_s": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "mean_ms": round(float(lat.mean()), 1)}


def checkpoints_of(model_dir: Path, meta: dict) -> list[Path]:
    """The fold checkpoints an export came from (paths in metadata are relative to the run folder)."""
    run_dir = model_dir.parents[1]
    out = []
    for rel in meta.get("checkpoints") or []:
        for base in (run_dir, run_dir / "kfold" / str(meta.get("kfold_name", "")), model_dir.parent):
            if (base / rel).is_file():
                out.append(base / rel)
                break
    return out


def onnx_vs_torch(model_dir: Path, checkpoints: list[Path], n: int, threads: int) -> dict:
    """Median batch-1 latency of the exported graph vs the torch eager ensemble it was exported from."""
    from lib import export

    meta = json.loads((model_dir / "metadata.json").read_text())
    members, ck_meta = export.load_members(checkpoints)
    ens = export.ProbabilityEnsemble(members, ck_meta["task"]).eval()
    shape = meta["input"]["shape"][1:]
    out = export.latency(ens, model_dir / "model.onnx", shape, batch=1, n=n, threads=threads)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="export folder (model.onnx, metadata.json, sample.*)")
    ap.add_argument("--url", default=None, help="use this running service instead of starting one")
    ap.add_argument("--file", type=Path, default=None, help="image to upload (default: the export's sample)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400, help="total uploads (all clients together)")
    ap.add_argument("--seconds", type=float, default=60.0, help="stop issuing requests after this long")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime / torch intra-op threads")
    ap.add_argument("--latency-n", type=int, default=100, help="timed runs per engine for the ONNX vs torch ratio")
    ap.add_argument("--checkpoints", nargs="*", type=Path, default=None, help="fold best.pt files (default: "
                    "from metadata.json)")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.requests <= MAX_REQUESTS or \
            not 0 < args.seconds <= MAX_SECONDS:
        ap.error(f"bounds: 1..{MAX_CLIENTS} clients, 1..{MAX_REQUESTS} requests, 0..{MAX_SECONDS:g} s")
    meta = json.loads((args.model / "metadata.json").read_text())
    results: dict = {"model": str(args.model), "model_name": meta.get("model_name"), "n_models": meta.get("n_models"),
                     "input_shape": meta["input"]["shape"], "cpu_count": os.cpu_count(),
                     "load_avg_1min": round(os.getloadavg()[0], 2)}
    if not args.skip_load:
        sample = args.file or args.model / (meta.get("sample") or {}).get("file", "")
        if not Path(sample).is_file():
            ap.error("no --file given and the export has no sample file")
        payload = Path(sample).read_bytes()
        proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args.model, args.threads)
        try:
            results["load"] = {"file": Path(sample).name, "bytes": len(payload),
                               **run_load(url, payload, args.clients, args.requests, args.seconds)}
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=20)
        ld = results["load"]
        print(f"load: {ld['clients']} clients, {ld['requests_ok']} ok in {ld['wall_s']} s -> "
              f"{ld['throughput_rps']} req/s; latency p50 {ld['p50_ms']} ms, p95 {ld['p95_ms']} ms, "
              f"p99 {ld['p99_ms']} ms; statuses {ld['statuses']}")
    if not args.skip_latency:
        ckpts = args.checkpoints or checkpoints_of(args.model, meta)
        if not ckpts:
            print("latency: no checkpoints found for the torch side (pass --checkpoints)")
        else:
            lat = results["latency_batch1"] = onnx_vs_torch(args.model, ckpts, args.latency_n, args.threads)
            print(f"latency batch 1, {lat['threads']} thread(s): torch eager {lat['torch_ms']:.2f} ms, "
                  f"ONNX Runtime {lat['onnx_ms']:.2f} ms -> ONNX {lat['speedup']:.2f}x faster (target >= 1.3x)")
    results["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
