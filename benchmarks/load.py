"""Load test of ``vqakit serve`` on loopback: latency of one question, then many concurrent clients.

    python benchmarks/load.py --checkpoint runs/easy-vqa/checkpoint [--clients 16] [--duration 20] [--distinct]

Starts the server as a subprocess on 127.0.0.1 (a free port; never another host), waits for ``/health``,
then measures:

1. ``single``: one client, one question per request, ``--latency_requests`` sequential ``POST /predict``
   calls (JSON, base64 PNG, distinct easy-VQA test image/question pairs) after a warm-up: p50/p95/p99 ms.
2. ``load``: ``--clients`` concurrent clients (asyncio + aiohttp, keep-alive) sending the same kind of
   requests for ``--duration`` seconds, then stopping: errors (anything but 200, and exceptions), p50/p99
   latency, questions per second, the server's batch statistics and its RSS at the start, every second and
   at the end (memory must stay flat).

``--distinct``: every question of every request is a distinct string (``"<test question> #<k>"``, k counting
up), so neither the server's question cache nor the de-duplication of a batch's questions can skip the text
tower; without it the requests cycle through the test set's questions (107 distinct strings), which the cache
mostly answers. The server runs with its defaults (``vqakit serve``) unless flags below override them.

Writes JSON to ``--out`` (default ``benchmarks/results/load-<backend>[-distinct].json``). The client runs on the same
machine and competes with the server for the CPU, so the numbers are a lower bound of the server's capacity
(aiohttp's client costs ~0.3 ms of CPU per request here, httpx's ~2.5 ms: hence aiohttp). On a machine busy
with other work, ``projected_questions_per_s_all_cores`` (questions per CPU second of server + client, times
the cores) estimates what the machine would sustain if it were free; it is an estimate, not a measurement.
Targets (issue 5, 2 CPU cores, default easy-VQA checkpoint): single p50 <= 25 ms; >= 300 questions/s with
16 clients; 0 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import HOST, free_port, percentile, rss_mib  # noqa: E402

JSON = {"content-type": "application/json"}
NAN = float("nan")  # the latency percentiles of no requests


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RequestBodies:
    """JSON bodies over distinct easy-VQA test images, each image's own questions; ``body(i)`` is request i's.
    With ``distinct`` each question gets the suffix `` #<k>`` with k unique across all requests."""

    def __init__(self, n: int, questions_per_request: int, distinct: bool = False):
        from vqakit.data.sources import load_easy_vqa

        by_image: dict[int, list] = {}
        for e in load_easy_vqa("test"):
            by_image.setdefault(e.image_id, []).append(e)
        self.q, self.distinct = questions_per_request, distinct
        self.images, self.questions = [], []
        for examples in list(by_image.values())[:n]:
            self.images.append(base64.b64encode(Path(examples[0].image).read_bytes()))
            qs = [e.question for e in examples][:questions_per_request]
            self.questions.append(qs + [qs[-1]] * (questions_per_request - len(qs)))

    def body(self, i: int) -> bytes:
        j = i % len(self.images)
        qs = [f"{q} #{i * self.q + k}" for k, q in enumerate(self.questions[j])] if self.distinct else self.questions[j]
        field = {"question": qs[0]} if self.q == 1 else {"questions": qs}
        return json.dumps(field).encode()[:-1] + b', "image_base64": "' + self.images[j] + b'"}'


async def single_client(url: str, bodies: RequestBodies, warmup: int, n: int, offset: int = 0) -> list[float]:
    import aiohttp

    times = []
    async with aiohttp.ClientSession(headers=JSON) as session:
        for i in range(warmup + n):
            body = bodies.body(offset + i)
            start = time.perf_counter()
            async with session.post(url, data=body) as r:
                text = await r.read()
            elapsed = 1000 * (time.perf_counter() - start)
            if r.status != 200:
                raise RuntimeError(f"single-client request failed: {r.status} {text[:200]!r}")
            if i >= warmup:
                times.append(elapsed)
    return sorted(times)


async def load(url: str, bodies: RequestBodies, clients: int, duration: float, pid: int, offset: int = 0) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    done = 0
    stop_at = time.perf_counter() + duration
    rss_trace = [rss_mib(pid)]

    async def client_loop(k: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop_at:
            body = bodies.body(offset + i)  # request numbers are unique across clients (distinct questions)
            i += clients
            start = time.perf_counter()
            try:
                async with session.post(url, data=body) as r:
                    await r.read()
                    status = str(r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status = type(err).__name__
            latencies.append(1000 * (time.perf_counter() - start))
            if status == "200":
                done += 1
            else:
                errors[status] = errors.get(status, 0) + 1

    async def sample_rss() -> None:
        while time.perf_counter() < stop_at:
            await asyncio.sleep(1.0)
            rss_trace.append(rss_mib(pid))

    connector = aiohttp.TCPConnector(limit=clients)  # one keep-alive connection per client
    async with aiohttp.ClientSession(connector=connector, headers=JSON,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = time.perf_counter()
        await asyncio.gather(sample_rss(), *(client_loop(k, session) for k in range(clients)))
        wall = time.perf_counter() - start
    rss_trace.append(rss_mib(pid))
    latencies.sort()
    return {"requests": len(latencies), "ok": done, "errors": sum(errors.values()), "error_kinds": errors,
            "wall_s": round(wall, 2), "p50_ms": percentile(latencies, 0.5, NAN),
            "p99_ms": percentile(latencies, 0.99, NAN),
            "requests_per_s": round(done / wall, 1), "rss_mib": rss_trace}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/easy-vqa/checkpoint")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    ap.add_argument("--quantize", default=None, choices=["int8", "none"],
                    help="default: serve's (INT8 where the checkpoint's INT8 check passed); none: float32")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients of the load phase (16-32)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of the load phase")
    ap.add_argument("--questions_per_request", type=int, default=1)
    ap.add_argument("--latency_requests", type=int, default=200)
    ap.add_argument("--distinct", action="store_true", help="every question string distinct (see above)")
    ap.add_argument("--max_batch_size", type=int, default=None, help="server setting (default: serve's)")
    ap.add_argument("--max_wait_ms", type=float, default=None, help="server setting (default: serve's)")
    ap.add_argument("--question_cache", type=int, default=None, help="server question cache (0: off; "
                    "default: serve's)")
    ap.add_argument("--threads", type=int, default=None, help="server intra-op threads (default: serve's)")
    ap.add_argument("--workers", type=int, default=None, help="server batches at once (default: serve's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 0 < args.duration <= 120:
        ap.error("--clients must lie in 1..64 and --duration in (0, 120] s: this is a bounded test")

    port = free_port()
    cmd = [sys.executable, "-m", "vqakit.cli", "serve", "--checkpoint", args.checkpoint, "--host", HOST,
           "--port", str(port), "--ui", "false", "--server.backend", args.backend]
    for name in ("quantize", "max_batch_size", "max_wait_ms", "question_cache", "threads", "workers"):
        if getattr(args, name) is not None:
            value = str(getattr(args, name))
            cmd += [f"--server.{name}", "null" if value == "none" else value]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"vqakit-load-server-{port}.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://{HOST}:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode}; see {log.name}")
            try:
                health = httpx.get(f"{base}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer /health within 300 s; see {log.name}") from None
                time.sleep(0.5)
        url = f"{base}/predict"
        bodies = RequestBodies(args.latency_requests + 50, args.questions_per_request, args.distinct)
        single = asyncio.run(single_client(url, bodies, warmup=30, n=args.latency_requests))
        rss_before = rss_mib(server.pid)
        server_cpu, client_cpu = cpu_s(server.pid), time.process_time()
        loaded = asyncio.run(load(url, bodies, args.clients, args.duration, server.pid,
                                  offset=30 + args.latency_requests))
        server_cpu, client_cpu = cpu_s(server.pid) - server_cpu, time.process_time() - client_cpu
        health_end = httpx.get(f"{base}/health", timeout=10).json()
        stats = health_end["batching"]
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    q = args.questions_per_request
    result = {
        "benchmark": "http_load",
        "checkpoint": args.checkpoint,
        "backend": health["backend"],
        "quantize": health.get("quantize"),  # what the server chose
        "quantize_asked": args.quantize,
        "questions_per_request": q,
        "distinct_questions": args.distinct,
        "single": {"requests": len(single), "p50_ms": percentile(single, 0.5, NAN),
                   "p95_ms": percentile(single, 0.95, NAN), "p99_ms": percentile(single, 0.99, NAN),
                   "mean_ms": round(statistics.fmean(single), 2)},
        "load": {"clients": args.clients, "duration_s": args.duration, **loaded,
                 "questions_per_s": round(loaded["requests_per_s"] * q, 1),
                 "rss_before_load_mib": rss_before,
                 # CPU seconds spent while loaded; on a machine shared with other work, the questions answered
                 # per CPU second (server + client) x the cores is what 2 free cores would sustain
                 "server_cpu_s": round(server_cpu, 2), "client_cpu_s": round(client_cpu, 2),
                 "questions_per_cpu_s": round(loaded["ok"] * q / max(server_cpu + client_cpu, 1e-9), 1),
                 "projected_questions_per_s_all_cores": round(
                     (os.cpu_count() or 1) * loaded["ok"] * q / max(server_cpu + client_cpu, 1e-9), 1)},
        "batching": stats,
        "server": {"max_batch_size": stats["max_batch_size"], "max_wait_ms": stats["max_wait_ms"],
                   "question_cache": (health_end.get("question_cache") or {}).get("size", 0),
                   "threads": args.threads, "command": " ".join(cmd[1:])},
        "question_cache": health_end.get("question_cache"),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(json.dumps(result, indent=2))
    suffix = ({"int8": "-int8", "none": "-float32"}.get(args.quantize, "")
              + ("-nocache" if args.question_cache == 0 else "") + ("-distinct" if args.distinct else ""))
    out = Path(args.out or f"benchmarks/results/load-{health['backend']}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
