"""Latency of the HTTP server: p50/p95 request latency, time to first token and tokens/s for
caption, answer and chat, with one client and with N concurrent clients.

    .venv/bin/python benchmarks/serve_latency.py [--model shapes-vlm | --model random] [--requests 12]
                                                 [--concurrency 8] [--workers 2] [--threads 1]

The server is `multimodal serve` in a subprocess (as a user runs it); the clients are httpx
threads in this process. Every job is sent as a streamed chat completion (TTFT = time to the
first content chunk; decode tokens/s = (tokens - 1) / (latency - TTFT)); caption and answer are
also timed on their own endpoints (/v1/caption, /v1/answer; /v1/caption decodes with the
model's caption beam, as `model.caption()` does, so it takes longer than the streamed greedy
caption). The reference is the same
generation called in this process without HTTP, one at a time, before the server starts:
`server_overhead` is the single-client p50 over that reference's p50, `load_slowdown` the
loaded p50 over the single-client p50. `--model random` builds a random VLM of a small size
(for machines without the shipped checkpoint: its answers are nonsense, its timings real).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from multimodal_models.shapes.world import render_scene, sample_scene  # noqa: E402
from multimodal_models.loading import load  # noqa: E402
from multimodal_models.models.vlm import CAPTION_PROMPT  # noqa: E402

QUESTION = "what color is the circle?"


def random_vlm(folder: Path) -> Path:
    """A random VLM of a small realistic size, with a Shapes-world word tokenizer."""
    from multimodal_models.data.preprocess import ImageProcessor
    from multimodal_models.data.tokenizer import WordTokenizer
    from multimodal_models.models.chat import CHAT_SPECIAL_TOKENS
    from multimodal_models.models.text import DecoderConfig
    from multimodal_models.models.vision import VisionConfig
    from multimodal_models.models.vlm import VisionLanguageModel, VLMConfig

    torch.manual_seed(0)
    words = ("is there a an the red blue green yellow purple orange white cyan circle square star triangle "
             "hexagon diamond what color shape size how many yes no one two three four small large describe "
             "image of and with left right above below . ?")
    tokenizer = WordTokenizer.train([words], extra_special_tokens=CHAT_SPECIAL_TOKENS)
    config = VLMConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4, pool="mean", class_token=False),
        decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, width=256, depth=4, heads=4, max_length=256),
        pixel_shuffle=2, image_token_id=tokenizer.image_id)
    model = VisionLanguageModel(config).eval()
    with torch.no_grad():  # keep it from stopping at once, so that every answer has the full token budget
        model.decoder.lm_head.weight[tokenizer.eos_id] -= 10.0
        model.decoder.lm_head.weight[tokenizer.token_to_id("<user>")] -= 10.0
    model.tokenizer = tokenizer
    model.image_processor = ImageProcessor(size={"height": 64, "width": 64})
    return model.save_pretrained(folder / "random-vlm")


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def job_messages(job: str, uri: str) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": uri}}
    if job == "caption":
        return [{"role": "user", "content": [image, {"type": "text", "text": CAPTION_PROMPT}]}]
    if job == "answer":
        return [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}]
    return [{"role": "user", "content": [image, {"type": "text", "text": "describe the image."}]},
            {"role": "assistant", "content": "a red circle and a blue star."},
            {"role": "user", "content": "what color is the star?"}]


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": round(at(0.5), 2), "p95": round(at(0.95), 2)}


def summarize(samples: list[dict]) -> dict:
    ok = [s for s in samples if s["status"] == 200]
    out = {"requests": len(samples), "errors": len(samples) - len(ok)}
    if ok:
        out["latency_ms"] = percentiles([s["latency"] * 1000 for s in ok])
        if "ttft" in ok[0]:
            out["ttft_ms"] = percentiles([s["ttft"] * 1000 for s in ok])
            rates = [(s["tokens"] - 1) / (s["latency"] - s["ttft"]) for s in ok if s["tokens"] > 1 and
                     s["latency"] > s["ttft"]]
            if rates:
                out["decode_tokens_per_s"] = percentiles(rates)
            out["mean_tokens"] = round(statistics.mean(s["tokens"] for s in ok), 1)
    return out


# --- the reference: the same generation in this process, no HTTP -------------------------------------


def reference(model, images: list, jobs: list[str], tokens: int) -> dict:
    from PIL import Image

    samples: dict[str, list[dict]] = {job: [] for job in jobs}
    for k, uri in enumerate(images):
        for job in jobs:
            messages = job_messages(job, uri)
            pil = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
            converted = []
            for m in messages:
                content = m["content"]
                if isinstance(content, list):
                    content = [{"type": "image", "image": pil} if p["type"] == "image_url" else p for p in content]
                converted.append({"role": m["role"], "content": content})
            start = time.perf_counter()
            first, count = None, 0
            for _piece in model.chat(converted, stream=True, max_new_tokens=tokens):
                first = first or time.perf_counter()
                count += 1
            end = time.perf_counter()
            samples[job].append({"status": 200, "latency": end - start, "ttft": (first or end) - start,
                                 "tokens": count})
    return {job: summarize(s) for job, s in samples.items()}


# --- clients ------------------------------------------------------------------------------------------


def streamed(client, job: str, uri: str, tokens: int) -> dict:
    body = {"messages": job_messages(job, uri), "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage = None, None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code, "latency": time.perf_counter() - start}
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


def endpoint(client, job: str, uri: str, tokens: int) -> dict:
    body = {"image": uri, "max_tokens": tokens}
    if job == "answer":
        body["question"] = QUESTION
    start = time.perf_counter()
    response = client.post(f"/v1/{job}", json=body)
    return {"status": response.status_code, "latency": time.perf_counter() - start}


def run_clients(url: str, work: list[tuple], concurrency: int) -> tuple[dict, float]:
    """work: (kind, job, uri) items, spread over `concurrency` client threads. Returns samples by key, wall time."""
    import httpx

    results: dict[str, list[dict]] = {}
    lock = threading.Lock()
    queue = list(work)

    def client_loop(_):
        with httpx.Client(base_url=url, timeout=300) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    kind, job, uri, tokens = queue.pop(0)
                sample = (streamed if kind == "stream" else endpoint)(client, job, uri, tokens)
                with lock:
                    results.setdefault(f"{job}{'' if kind == 'stream' else '_endpoint'}", []).append(sample)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-vlm", help="VLM name or folder; 'random' builds a random one")
    parser.add_argument("--requests", type=int, default=12, help="requests per job and kind, per phase")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients in the load phase")
    parser.add_argument("--tokens", type=int, default=24, help="max_tokens of every request")
    parser.add_argument("--workers", type=int, default=2, help="the server's inference threads")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (server and reference)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    jobs = ["caption", "answer", "chat"]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = str(random_vlm(Path(tmp))) if args.model == "random" else args.model
        model = load(model_path)
        size = model.config.vision.image_size
        images = [data_uri(render_scene(sample_scene(random.Random(k)), size)) for k in range(args.requests)]
        direct = reference(model, images, jobs, args.tokens)
        del model
        command = [sys.executable, "-m", "multimodal_models.cli", "serve", "--model", model_path, "--embedder", "none",
                   "--port", "0", "--workers", str(args.workers), "--threads", str(args.threads), "--max-tokens",
                   str(max(args.tokens, 1)), "--max-concurrent", str(max(64, args.concurrency * 2))]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            line = server.stdout.readline()
            if not line.startswith("multimodal serve: http"):
                raise SystemExit(f"the server did not start: {line!r}")
            url = line.split()[2].rstrip("/")
            work = [(kind, job, uri, args.tokens) for uri in images for job in jobs for kind in ("stream", "endpoint")
                    if kind == "stream" or job != "chat"]
            run_clients(url, work[: len(jobs) * 2], 1)  # warm-up
            single, single_wall = run_clients(url, work, 1)
            loaded, loaded_wall = run_clients(url, work * 2, args.concurrency)
        finally:
            server.terminate()
            server.wait(10)
    single_summary = {key: summarize(samples) for key, samples in sorted(single.items())}
    loaded_summary = {key: summarize(samples) for key, samples in sorted(loaded.items())}
    total_tokens = sum(s.get("tokens", 0) for samples in loaded.values() for s in samples)
    result = {
        "model": args.model, "max_tokens": args.tokens, "workers": args.workers, "threads": args.threads,
        "device": "cpu", "cpus": os.cpu_count(),
        "reference_in_process": direct,
        "single_client": {**single_summary, "requests_per_s": round(len(work) / single_wall, 2)},
        "under_load": {"concurrency": args.concurrency, **loaded_summary,
                       "requests_per_s": round(2 * len(work) / loaded_wall, 2),
                       "generated_tokens_per_s": round(total_tokens / loaded_wall, 1)},
        "server_overhead": {job: round(single_summary[job]["latency_ms"]["p50"] / direct[job]["latency_ms"]["p50"], 2)
                            for job in jobs if "latency_ms" in single_summary.get(job, {})},
        "load_slowdown": {job: round(loaded_summary[job]["latency_ms"]["p50"] / single_summary[job]["latency_ms"]["p50"],
                                     2) for job in jobs if "latency_ms" in loaded_summary.get(job, {})},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
