"""Continuous batching in the server: 1, 8 and 32 concurrent streaming clients on shapes-vlm, with
batching on (--max-batch-size 32) and off (--max-batch-size 1, the reference), in one run.

    .venv/bin/python benchmarks/serve_batching.py [--model shapes-vlm] [--clients 1 8 32] [--requests 256]
                                                  [--tokens 32] [--workers 2] [--threads 1]

Both servers are `multimodal serve` subprocesses (as a user runs them), started side by side and
measured in turn, level by level; the clients are httpx threads in this process, which send
`--requests` streamed chat completions per level between them (each client its share, one after
another; a Shapes scene each, "describe the image."), so every level does the same work. For each level: total tokens/s (completion tokens of all requests / wall time), time to
first token (to the first content chunk) p50/p95, and request latency p50/p95. Ratios: each
mode's total tokens/s at N clients over its own at one client (target for batching: >= 4 at 32),
and batched over reference at each level. The load average before and after is printed too: other
jobs on the machine change every figure. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serve_latency import data_uri, percentiles  # noqa: E402

from multimodal_models.shapes.world import render_scene, sample_scene  # noqa: E402

PROMPT = "describe the image."


def start_server(model: str, batch: int, args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "multimodal_models.cli", "serve", "--model", model, "--embedder", "none",
               "--port", "0", "--workers", str(args.workers), "--threads", str(args.threads),
               "--max-tokens", str(args.tokens), "--max-batch-size", str(batch), "--max-queue", "256",
               "--max-concurrent", "512"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = server.stdout.readline()
    if not line.startswith("multimodal serve: http"):
        server.terminate()
        raise SystemExit(f"the server did not start: {line!r}")
    return server, line.split()[2].rstrip("/")


def streamed(client, uri: str, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": PROMPT}]}],
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage = None, None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"status": 200, "latency": end - start, "ttft": (first or end) - start,
            "tokens": usage["completion_tokens"] if usage else 0}


def level(url: str, images: list[str], clients: int, requests: int, tokens: int) -> dict:
    """`clients` threads, each sending requests / clients streams one after another."""
    requests = max(1, -(-requests // clients))
    import httpx

    samples: list[dict] = []
    lock = threading.Lock()

    def client_loop(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for r in range(requests):
                sample = streamed(client, images[(c * requests + r) % len(images)], tokens)
                with lock:
                    samples.append(sample)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - start
    ok = [s for s in samples if s["status"] == 200]
    generated = sum(s["tokens"] for s in ok)
    return {"clients": clients, "requests": len(samples), "errors": len(samples) - len(ok),
            "tokens": generated, "wall_s": round(wall, 2), "tokens_per_s": round(generated / wall, 1),
            "ttft_ms": percentiles([s["ttft"] * 1000 for s in ok]),
            "latency_ms": percentiles([s["latency"] * 1000 for s in ok])}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-vlm", help="VLM name or folder")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=256, help="streams per level, shared by its clients "
                                                                  "(enough for 32 clients to reach a steady state)")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--batch", type=int, default=32, help="--max-batch-size of the batching server")
    parser.add_argument("--workers", type=int, default=2, help="the servers' worker threads (prefill)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the servers")
    args = parser.parse_args()
    from multimodal_models.loading import load

    size = load(args.model).config.vision.image_size
    images = [data_uri(render_scene(sample_scene(random.Random(k)), size)) for k in range(64)]
    modes = {"batched": args.batch, "reference": 1}
    servers = {mode: start_server(args.model, batch, args) for mode, batch in modes.items()}
    before = load_average()
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for mode, (_, url) in servers.items():  # warm-up
            level(url, images, 2, 4, args.tokens)
        for clients in args.clients:
            for mode, (_, url) in servers.items():
                results[mode].append(level(url, images, clients, args.requests, args.tokens))
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(10)
    after = load_average()

    def rate(mode: str, clients: int) -> float:
        return next(r["tokens_per_s"] for r in results[mode] if r["clients"] == clients)

    base = args.clients[0]
    ratios = {
        f"{mode}_tokens_per_s_vs_{base}_client": {str(n): round(rate(mode, n) / rate(mode, base), 2)
                                                 for n in args.clients} for mode in modes}
    ratios["batched_over_reference_tokens_per_s"] = {str(n): round(rate("batched", n) / rate("reference", n), 2)
                                                     for n in args.clients}
    ratios["batched_over_reference_ttft_p50"] = {
        str(n): round(next(r["ttft_ms"]["p50"] for r in results["batched"] if r["clients"] == n)
                      / next(r["ttft_ms"]["p50"] for r in results["reference"] if r["clients"] == n), 2)
        for n in args.clients}
    print(json.dumps({"model": args.model, "max_tokens": args.tokens, "requests_per_level": args.requests,
                      "max_batch_size": modes, "workers": args.workers, "threads": args.threads, "device": "cpu",
                      "cpus": os.cpu_count(), "load_average_before": before, "load_average_after": after,
                      "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
