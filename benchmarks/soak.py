"""Soak and restart test of ``vqakit serve`` on loopback: hours of traffic in minutes, then SIGKILL and SIGTERM.

    python benchmarks/soak.py --checkpoint runs/easy-vqa/checkpoint --minutes 10 --clients 16
    python benchmarks/soak.py --tiny --minutes 2 --clients 16     # a tiny random-weight checkpoint, built here

Starts the server as a subprocess on 127.0.0.1 (a free port; never another host) and runs three phases, each
bounded in time (the script always stops by itself):

1. ``soak``: ``--clients`` concurrent clients (asyncio + aiohttp) for ``--minutes``, each sending *distinct*
   questions (easy-VQA test image/question pairs, or generated images and question variants with ``--tiny``)
   with one request in ``--hostile_every`` replaced by a hostile one (invalid JSON, bad base64, not an image,
   an oversized body, wrong types, too many questions, a path outside the image root, ...). Valid requests
   must all get 200 and hostile ones a 4xx; anything else (5xx, a 200 for a hostile request, a connection error,
   a timeout) is counted as an error. Per minute: requests, errors, p50/p99 latency of valid requests and the
   server's RSS; over the run after the first minute (warm-up), the RSS slope (MiB per minute, least squares on
   one sample a second: ~0 means no leak).
2. ``kill``: the same load for ``--phase_seconds`` (and half of it again once the restarted server is up); the
   server is SIGKILLed a third of the way in and restarted on the same port at once. Errors must be connection
   errors of requests sent or in flight during the gap (kill -> first /health of the new server, both read on the
   clock of the request records); no request may hang (client timeout ``--timeout`` s); the restarted server must
   answer a fixed probe set exactly as before the kill.
3. ``sigterm``: the same load; SIGTERM in the middle. Requests in flight then must finish with 200, the server
   must finish its graceful shutdown (uvicorn logs "Finished server process", then exits with 0 or re-raises
   the SIGTERM: -15) within ``--timeout`` s; later requests see connection errors only.

Writes JSON to ``--out`` (default ``benchmarks/results/soak.json``) with ``passed`` and the reasons it did not.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import HOST, free_port, percentile, rss_mib  # noqa: E402

JSON_HEADERS = {"content-type": "application/json"}


def slope_per_minute(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, MiB)`` samples, in MiB per minute."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    return round(60 * sum((t - mx) * (v - my) for t, v in samples) / var, 3) if var else None


# -- requests ----------------------------------------------------------------------------------------------------

def png_bytes(seed: int, size=(48, 40)) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def valid_bodies(n: int, tiny: bool) -> list[bytes]:
    """``n`` JSON bodies with distinct (image, question) pairs."""
    if tiny:
        images = [base64.b64encode(png_bytes(i)).decode() for i in range(64)]
        words = ["color", "shape", "circle", "red", "blue", "rectangle", "triangle", "green"]
        return [json.dumps({"question": f"what is the {words[i % 8]} of shape {i}?",
                            "image_base64": images[i % 64]}).encode() for i in range(n)]
    from vqakit.data.sources import load_easy_vqa

    images: dict[str, str] = {}
    bodies = []
    for e in load_easy_vqa("test"):
        if len(bodies) >= n:
            break
        if e.image not in images:
            images[e.image] = base64.b64encode(Path(e.image).read_bytes()).decode()
        bodies.append(json.dumps({"question": e.question, "image_base64": images[e.image]}).encode())
    return bodies


def hostile_bodies() -> list[tuple[str, bytes]]:
    """Malformed or abusive requests, each of which must get a 4xx."""
    good = base64.b64encode(png_bytes(0)).decode()
    return [
        ("invalid json", b'{"question": "what?", "image_base64": '),
        ("not an object", b'["what?"]'),
        ("no image", json.dumps({"question": "what?"}).encode()),
        ("no question", json.dumps({"image_base64": good}).encode()),
        ("bad base64", json.dumps({"question": "what?", "image_base64": "%%%not-base64%%%"}).encode()),
        ("not an image", json.dumps({"question": "what?",
                                     "image_base64": base64.b64encode(b"GIF89a garbage" * 50).decode()}).encode()),
        ("wrong types", json.dumps({"question": 12, "image_base64": good, "top_k": "five"}).encode()),
        ("top_k out of range", json.dumps({"question": "what?", "image_base64": good, "top_k": 10**6}).encode()),
        ("empty question", json.dumps({"question": "", "image_base64": good}).encode()),
        ("too many questions", json.dumps({"questions": ["what?"] * 1_000, "image_base64": good}).encode()),
        ("path outside the root", json.dumps({"question": "what?", "image_path": "../../etc/passwd"}).encode()),
        ("oversized body", json.dumps({"question": "what?", "image_base64": "A" * (15 << 20)}).encode()),
    ]


# -- the server --------------------------------------------------------------------------------------------------

class Server:
    """``vqakit serve`` as a subprocess on loopback; ``start`` waits for ``/health``."""

    def __init__(self, checkpoint: str, port: int, log_path: Path, extra: list[str] = (), start_timeout: float = 300):
        self.cmd = [sys.executable, "-m", "vqakit.cli", "serve", "--checkpoint", str(checkpoint), "--host", HOST,
                    "--port", str(port), "--ui", "false", "--server.backend", "torch", *extra]
        self.base = f"http://{HOST}:{port}"
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.healthy_at: float | None = None  # time.perf_counter() when /health last answered in start()

    def start(self, timeout: float | None = None) -> float:
        """Start and wait until ``/health`` answers; returns the seconds that took (and sets ``healthy_at``)."""
        import httpx

        timeout = self.start_timeout if timeout is None else timeout
        start = time.monotonic()
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                httpx.get(f"{self.base}/health", timeout=2).raise_for_status()
                self.healthy_at = time.perf_counter()
                return time.monotonic() - start
            except httpx.HTTPError:
                if time.monotonic() - start > timeout:
                    raise RuntimeError(f"no /health within {timeout} s; see {self.log_path}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


# -- load --------------------------------------------------------------------------------------------------------

async def run_load(server: Server, bodies: list[bytes], hostile: list[tuple[str, bytes]], clients: int,
                   seconds: float, hostile_every: int, timeout: float, events=None) -> list[dict]:
    """``clients`` loops for ``seconds``; one record per request: t (s from start), kind, status, ms.
    ``events``: ``[(at_s, coroutine function)]`` run during the load (the kill / SIGTERM); such a function gets
    the time it started and may return a number of seconds to keep the load going after it returns."""
    import aiohttp

    records: list[dict] = []
    t0 = time.perf_counter()
    state = {"stop_at": t0 + seconds, "sent": 0, "hostile": 0, "events": len(events or [])}

    async def client(k: int, session) -> None:
        i = k
        while time.perf_counter() < state["stop_at"] or state["events"]:  # the load lasts until the events end
            state["sent"] += 1
            if hostile_every and state["sent"] % hostile_every == 0:
                name, body = hostile[state["hostile"] % len(hostile)]
                state["hostile"] += 1
                kind = "hostile"
            else:
                name, body, kind = None, bodies[i % len(bodies)], "valid"
                i += clients
            start = time.perf_counter()
            try:
                async with session.post(f"{server.base}/predict", data=body) as r:
                    await r.read()
                    status = r.status
            except asyncio.TimeoutError:
                status = "timeout"
            except aiohttp.ClientError as err:
                status = type(err).__name__
                await asyncio.sleep(0.05)  # a refused connection returns at once: do not spin
            records.append({"client": k, "t": start - t0, "end": time.perf_counter() - t0, "kind": kind, "name": name,
                            "status": status, "ms": 1000 * (time.perf_counter() - start)})

    async def timed(at: float, fn) -> None:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        more = await fn(time.perf_counter() - t0)
        state["events"] -= 1
        if more:
            state["stop_at"] = max(state["stop_at"], time.perf_counter() + more)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=JSON_HEADERS,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(client(k, session) for k in range(clients)),
                             *(timed(at, fn) for at, fn in (events or [])))
    return records


# what a client sees when the server process is gone or going: the connect is refused (ClientConnectorError), the
# server closes a kept-alive connection (ServerDisconnectedError), or the kernel resets a connection that the dying
# listener had accepted but never served (ClientOSError: "Connection reset by peer")
CONNECTION_ERRORS = frozenset({"ClientConnectorError", "ServerDisconnectedError", "ClientOSError"})


def is_error(r: dict) -> bool:
    if r["kind"] == "valid":
        return r["status"] != 200
    return not (isinstance(r["status"], int) and 400 <= r["status"] < 500)


async def probe(server: Server, bodies: list[bytes]) -> list:
    """The responses to a fixed set of requests (compared before the kill and after the restart)."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession(headers=JSON_HEADERS, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for body in bodies:
            async with session.post(f"{server.base}/predict", data=body) as r:
                body_json = await r.json()
                out.append([r.status, _rounded(body_json.get("predictions", body_json))])  # not time_ms
    return out


def _rounded(x, places: int = 4):
    """Scores to ``places`` decimals: the same answers of a restarted server may differ in the last float bits
    (another thread layout of the same kernels), which is not a different answer."""
    if isinstance(x, float):
        return round(x, places)
    if isinstance(x, list):
        return [_rounded(v, places) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v, places) for k, v in x.items()}
    return x


def soak_phase(server: Server, bodies, hostile, args) -> dict:
    seconds = 60 * args.minutes
    rss: list[tuple[float, float]] = []

    async def sampler() -> None:
        t0 = time.perf_counter()
        while (t := time.perf_counter() - t0) < seconds:
            rss.append((t, rss_mib(server.proc.pid)))
            await asyncio.sleep(1.0)

    async def both():
        _, records = await asyncio.gather(sampler(), run_load(server, bodies, hostile, args.clients, seconds,
                                                              args.hostile_every, args.timeout))
        return records

    records = asyncio.run(both())
    minutes = []
    for m in range(max(1, int(-(-seconds // 60)))):
        rows = [r for r in records if 60 * m <= r["t"] < 60 * (m + 1)]
        ms = sorted(r["ms"] for r in rows if r["kind"] == "valid" and r["status"] == 200)
        samples = [v for t, v in rss if 60 * m <= t < 60 * (m + 1)]
        minutes.append({"minute": m + 1, "requests": len(rows), "valid": sum(r["kind"] == "valid" for r in rows),
                        "hostile": sum(r["kind"] == "hostile" for r in rows), "errors": sum(map(is_error, rows)),
                        "p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99),
                        "rss_mib": samples[-1] if samples else None})
    hostile_status: dict[str, dict[str, int]] = {}
    for r in records:
        if r["kind"] == "hostile":
            by = hostile_status.setdefault(r["name"], {})
            by[str(r["status"])] = by.get(str(r["status"]), 0) + 1
    errors = [r for r in records if is_error(r)]
    return {"seconds": seconds, "clients": args.clients, "requests": len(records),
            "valid_requests": sum(r["kind"] == "valid" for r in records),
            "hostile_requests": sum(r["kind"] == "hostile" for r in records),
            "valid_errors": sum(r["kind"] == "valid" for r in errors),
            "hostile_not_4xx": sum(r["kind"] == "hostile" for r in errors),
            "error_examples": errors[:10], "hostile_status": hostile_status, "per_minute": minutes,
            "rss_start_mib": rss[0][1] if rss else None, "rss_end_mib": rss[-1][1] if rss else None,
            "rss_slope_mib_per_min_after_warmup": slope_per_minute([s for s in rss if s[0] >= min(60, seconds / 2)])}


def kill_and_restart(server: Server, gap: dict, more: float):
    """The kill event of ``run_load``: SIGKILL, reap, restart on the same port, then ``more`` seconds of load.

    ``gap`` gets ``kill_s``, ``reaped_s`` and ``healthy_s`` on the load's clock (seconds since its start, as the
    request records' ``t`` and ``end``), each read when it happened. ``healthy_s`` is not ``kill_s + restart_s``:
    reaping the killed process and handing ``start`` to a thread come before ``start`` begins its own clock, and on
    a loaded machine they take a second or more, which would close the gap before the new server answered."""

    async def event(at: float) -> float:
        t0 = time.perf_counter() - at  # the load's start, on the perf_counter clock
        gap["kill_s"] = at
        server.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(server.proc.wait)
        gap["reaped_s"] = time.perf_counter() - t0
        gap["restart_s"] = await asyncio.to_thread(server.start)
        gap["healthy_s"] = server.healthy_at - t0
        return more  # load on the restarted server too

    return event


def kill_phase(server: Server, bodies, hostile, args) -> dict:
    probes = bodies[:16]
    before = asyncio.run(probe(server, probes))
    gap = {}
    records = asyncio.run(run_load(server, bodies, hostile, args.clients, args.phase_seconds, args.hostile_every,
                                   args.timeout, events=[(args.phase_seconds / 3,
                                                          kill_and_restart(server, gap, args.phase_seconds / 2))]))
    after = asyncio.run(probe(server, probes))
    errors = [r for r in records if is_error(r)]
    lo, hi = gap["kill_s"], gap["healthy_s"]
    inside = [r for r in errors if r["end"] >= lo - 0.01 and r["t"] <= hi + 0.01]
    # a keep-alive connection to the killed process, reused once after the restart: the client sees it closed
    # at once (ServerDisconnectedError) and reconnects; at most one per client, never a hang
    stale, seen = [], set()
    for r in errors:
        if r not in inside and r["status"] == "ServerDisconnectedError" and r["client"] not in seen:
            seen.add(r["client"])
            stale.append(r)
    outside = [r for r in errors if r not in inside and r not in stale]
    # a SIGKILL can also cut a response short (ClientPayloadError): any aiohttp error is a connection error here
    not_connection = [r for r in errors if isinstance(r["status"], int) or r["status"] == "timeout"]
    return {"seconds": args.phase_seconds, "requests": len(records), "errors": len(errors),
            "error_kinds": _kinds(errors), "errors_outside_gap": len(outside),
            "stale_keepalive_after_restart": len(stale), "non_connection_errors":
            len(not_connection), "timeouts": sum(r["status"] == "timeout" for r in records),
            "gap_s": round(hi - lo, 2), **{k: round(v, 2) for k, v in gap.items()},
            "ok_after_restart": sum(r["status"] == 200 and r["t"] > hi for r in records),
            "answers_identical_after_restart": before == after, "error_examples": (outside or not_connection)[:5]}


def sigterm_phase(server: Server, bodies, hostile, args) -> dict:
    state = {}

    async def terminate(at: float) -> None:
        state["sigterm_s"] = at
        server.proc.send_signal(signal.SIGTERM)
        start = time.perf_counter()
        try:
            state["exit_code"] = await asyncio.to_thread(server.proc.wait, args.timeout)
        except subprocess.TimeoutExpired:
            state["exit_code"] = "did not exit"
        state["shutdown_s"] = round(time.perf_counter() - start, 2)

    records = asyncio.run(run_load(server, bodies, hostile, args.clients, args.phase_seconds, 0, args.timeout,
                                   events=[(args.phase_seconds / 3, terminate)]))
    at = state["sigterm_s"]
    # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done: exit code -15, after it logged
    # "Finished server process"
    finished = "Finished server process" in server.log_path.read_text().rsplit("Started server process", 1)[-1]
    state["graceful"] = state["exit_code"] in (0, -signal.SIGTERM) and finished
    in_flight = [r for r in records if r["t"] < at < r["end"]]
    errors = [r for r in records if is_error(r)]
    return {"seconds": args.phase_seconds, "requests": len(records), **state,
            "in_flight_at_sigterm": len(in_flight), "in_flight_ok": sum(r["status"] == 200 for r in in_flight),
            "errors_before_sigterm": sum(r["end"] < at for r in errors),
            "errors_after_sigterm": _kinds([r for r in errors if r["end"] >= at]),
            "timeouts": sum(r["status"] == "timeout" for r in records)}


def _kinds(records: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[str(r["status"])] = out.get(str(r["status"]), 0) + 1
    return out


def verdict(result: dict) -> list[str]:
    """Why the run failed (empty: passed)."""
    s, k, t = result["soak"], result["kill"], result["sigterm"]
    problems = []
    if s["valid_errors"]:
        problems.append(f"soak: {s['valid_errors']} valid requests failed")
    if s["hostile_not_4xx"]:
        problems.append(f"soak: {s['hostile_not_4xx']} hostile requests got no 4xx")
    if k["errors_outside_gap"] or k["non_connection_errors"] or k["timeouts"]:
        problems.append(f"kill: errors outside the gap {k['errors_outside_gap']}, not connection errors "
                        f"{k['non_connection_errors']}, timeouts {k['timeouts']}")
    if not k["answers_identical_after_restart"]:
        problems.append("kill: the restarted server answers differently")
    if k["ok_after_restart"] == 0:
        problems.append("kill: no request succeeded after the restart")
    if set(t["errors_after_sigterm"]) - CONNECTION_ERRORS:
        problems.append(f"sigterm: errors that are not connection errors after the SIGTERM: {t['errors_after_sigterm']}")
    if t["errors_before_sigterm"]:
        problems.append(f"sigterm: {t['errors_before_sigterm']} requests failed before the SIGTERM")
    if not t["graceful"] or t["in_flight_ok"] != t["in_flight_at_sigterm"] or t["timeouts"]:
        problems.append(f"sigterm: exit code {t['exit_code']} (graceful: {t['graceful']}), {t['in_flight_ok']}/"
                        f"{t['in_flight_at_sigterm']} in-flight requests answered, {t['timeouts']} timeouts")
    return problems


def tiny_checkpoint(root: Path) -> Path:
    """A tiny random-weight two-tower checkpoint (2-layer 32-wide ViT and BERT), built from configs only."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel

    from vqakit.models.two_tower import TwoTowerConfig, TwoTowerForQuestionAnswering
    from vqakit.towers.text import load_tokenizer

    torch.manual_seed(0)
    words = "what is the color of shape circle rectangle triangle red green blue ?".split()
    (root / "bert").mkdir(parents=True)
    (root / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(root / "bert" / "vocab.txt")).save_pretrained(root / "bert")
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64)).save_pretrained(root / "bert")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37), add_pooling_layer=False).save_pretrained(root / "vit")
    config = TwoTowerConfig(vision={"name": str(root / "vit"), "image_size": 32},
                            text={"name": str(root / "bert"), "max_length": 16}, hidden_size=32, num_heads=4,
                            num_fusion_layers=2,
                            id2label={i: a for i, a in enumerate(["yes", "no", "red", "circle", "2"])})
    path = root / "checkpoint"
    TwoTowerForQuestionAnswering(config).save_pretrained(path, tokenizer=load_tokenizer(str(root / "bert")))
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory to serve")
    ap.add_argument("--tiny", action="store_true", help="serve a tiny random-weight checkpoint built here instead")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the soak phase (at most 60)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (16-32)")
    ap.add_argument("--hostile_every", type=int, default=5, help="one request in this many is hostile")
    ap.add_argument("--phase_seconds", type=float, default=20.0, help="length of the kill and SIGTERM phases")
    ap.add_argument("--timeout", type=float, default=30.0, help="client timeout per request: a hang is an error")
    ap.add_argument("--max_wait_ms", type=float, default=2.0)
    ap.add_argument("--start_timeout", type=float, default=900.0,
                    help="seconds the server may take to answer /health after a start or the restart (a busy machine)")
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args(argv)
    if not 0 < args.minutes <= 60 or not 1 <= args.clients <= 64 or not 2 <= args.phase_seconds <= 120:
        ap.error("--minutes must lie in (0, 60], --clients in 1..64 and --phase_seconds in [2, 120]: a bounded test")
    if bool(args.checkpoint) == args.tiny:
        ap.error("pass --checkpoint DIR or --tiny")

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp)) if args.tiny else Path(args.checkpoint)
        port = free_port()
        server = Server(checkpoint, port, Path(tmp) / "server.log",
                        ["--server.max_wait_ms", str(args.max_wait_ms), "--access_log", "false"],
                        start_timeout=args.start_timeout)
        bodies = valid_bodies(20_000, args.tiny)
        hostile = hostile_bodies()
        started = time.time()
        try:
            startup_s = server.start()
            soak = soak_phase(server, bodies, hostile, args)
            kill = kill_phase(server, bodies, hostile, args)
            term = sigterm_phase(server, bodies, hostile, args)
        finally:
            server.stop()
            log_tail = (Path(tmp) / "server.log").read_text()[-3000:]
    result = {"benchmark": "soak", "checkpoint": "tiny random-weight (built by --tiny)" if args.tiny else str(checkpoint),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
              "command": " ".join(["python", "benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])]),
              "startup_s": round(startup_s, 2), "soak": soak, "kill": kill, "sigterm": term,
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    result["problems"] = verdict(result)
    result["passed"] = not result["problems"]
    if not result["passed"]:
        result["server_log_tail"] = log_tail
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "server_log_tail"}, indent=2))
    return result


if __name__ == "__main__":
    main()
