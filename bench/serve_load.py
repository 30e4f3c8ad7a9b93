"""Load test of `fromage serve` on loopback, bounded in clients and time (issue #5).

    PYTHONPATH=. .venv/bin/python bench/serve_load.py --index DIR [--clients 32] [--seconds 60]
        [--chat-share 0.25]   # 1.0: chat completions only

Starts the server twice in this process on a free 127.0.0.1 port (shipped model + the given
emoji index): once batched (retrieve/caption micro-batches of 16, chat completions decoded
16 at a time with continuous batching), once one request at a time (batch 1 for both).
Each time, `--clients` concurrent clients send requests back to back for `--seconds`: a
`--chat-share` of them short `/v1/chat/completions` (8 tokens), the rest `/v1/retrieve` with a
request for a random emoji. Reports requests/s (all, and chat alone), p50/p95 latency per
route, 5xx count and failed connections, the batched / one-at-a-time ratios, and the load
average before each configuration.

Memory (issue #7): the resident set of this process (server + clients) is sampled every
0.25 s; each configuration reports it at the start, its peak in the first and second half of
the load, and at the end. Bounded memory means the second half's peak does not keep climbing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import socket
import statistics
import threading
import time

import httpx
import uvicorn

from fromage.apps.serve import ServeConfig, server_config
from fromage.apps.serve.app import model_threads
from fromage.checkpoint import SHIPPED
from fromage.data.builtin import emoji_concepts
from fromage.pipeline import Fromage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_clients(port: int, clients: int, seconds: float, names: list[str], chat_share: float) -> dict:
    latencies: dict[str, list[float]] = {"retrieve": [], "chat": []}
    status_5xx = failed = 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(seed: int, http: httpx.AsyncClient) -> None:
        nonlocal status_5xx, failed
        rng = random.Random(seed)
        while time.monotonic() < stop:
            name = rng.choice(names)
            route = "chat" if rng.random() < chat_share else "retrieve"
            if route == "chat":
                url = "/v1/chat/completions"
                body = {"messages": [{"role": "user", "content": f"show me a {name}"}], "max_tokens": 8}
            else:
                url, body = "/v1/retrieve", {"text": f"show me a {name}", "k": 3}
            start = time.monotonic()
            try:
                reply = await http.post(url, json=body)
            except httpx.HTTPError:
                failed += 1
                continue
            if reply.status_code >= 500:
                status_5xx += 1
            latencies[route].append(time.monotonic() - start)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.monotonic() - start
    done = sum(len(v) for v in latencies.values())
    return {"wall": wall, "done": done, "5xx": status_5xx, "failed": failed, "latencies": latencies}


def rss_mb() -> float:
    """Current resident set of this process (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.every_s, self.samples, self.stop = every_s, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), rss_mb()))
            self.stop.wait(self.every_s)

    def summary(self) -> dict:
        times = [t for t, _ in self.samples]
        middle = (times[0] + times[-1]) / 2
        first = [v for t, v in self.samples if t <= middle]
        second = [v for t, v in self.samples if t > middle] or first
        return {
            "start": self.samples[0][1],
            "peak_first_half": max(first),
            "peak_second_half": max(second),
            "end": self.samples[-1][1],
        }


def serve_and_load(
    bot: Fromage,
    batch: int,
    clients: int,
    seconds: float,
    names: list[str],
    chat_share: float,
    threads: int = 0,
) -> dict:
    port = free_port()
    load = os.getloadavg()[0]
    # The server `fromage serve` runs (connection limits and the guarded protocol included).
    settings = ServeConfig(batch_size=batch, chat_batch_size=batch, threads=threads)
    config = server_config(bot, settings, port=port, log_level="warning")
    app = config.app
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    sampler = RssSampler()
    sampler.start()
    try:
        result = asyncio.run(run_clients(port, clients, seconds, names, chat_share))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sampler.stop.set()
        sampler.join()
    result["batches"] = app.state.batchers["retrieve"].batches
    result["widest_chat_step"] = app.state.chats.widest
    result["rss"] = sampler.summary()
    result["load"] = load
    return result


def report(label: str, r: dict) -> tuple[float, float]:
    rps = r["done"] / r["wall"]
    chat_rps = len(r["latencies"]["chat"]) / r["wall"]
    parts = [
        f"{label} (load average before {r['load']:.2f}): {r['done']} requests in {r['wall']:.1f} s = "
        f"{rps:.1f} req/s, chat {chat_rps:.2f} req/s"
    ]
    for route, values in r["latencies"].items():
        if values:
            cuts = statistics.quantiles(values, n=20) if len(values) > 1 else values * 19
            parts.append(
                f"{route} n={len(values)} p50 {statistics.median(values) * 1000:.0f} ms p95 {cuts[18] * 1000:.0f} ms"
            )
    parts.append(
        f"5xx {r['5xx']}, failed connections {r['failed']}, retrieve batches {r['batches']}, "
        f"widest chat step {r['widest_chat_step']} rows"
    )
    m = r["rss"]
    parts.append(
        f"RSS MB start {m['start']:.0f}, peak first half {m['peak_first_half']:.0f}, "
        f"peak second half {m['peak_second_half']:.0f}, end {m['end']:.0f}"
    )
    print("; ".join(parts), flush=True)
    return rps, chat_rps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--model", default=str(SHIPPED))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument(
        "--chat-share", type=float, default=0.25, help="share of chat requests (1.0: chat only)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="the model's threads (0: the server's default, CPUs - 1)"
    )
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 120:
        raise SystemExit("bounded load only: 1..64 clients, at most 120 s")
    if not 0.0 <= args.chat_share <= 1.0:
        raise SystemExit(f"--chat-share must be in [0, 1], got {args.chat_share}")
    bot = Fromage.from_pretrained(args.model, index=args.index)
    names = [c.name for c in emoji_concepts("google")]
    print(
        f"{args.clients} clients x {args.seconds:.0f} s per configuration, loopback, chat share "
        f"{args.chat_share}, model threads {model_threads(ServeConfig(threads=args.threads))}",
        flush=True,
    )
    run = (args.clients, args.seconds, names, args.chat_share, args.threads)
    batched = report("batched (16)", serve_and_load(bot, 16, *run))
    single = report("one at a time", serve_and_load(bot, 1, *run))
    print(f"throughput, batched / one at a time: {batched[0] / single[0]:.2f}x")
    if single[1]:
        print(f"chat requests/s, batched / one at a time: {batched[1] / single[1]:.2f}x")
    print(
        f"peak RSS of the whole run (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
