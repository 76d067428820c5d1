"""Benchmark: `qlora serve` under load, measured with the official `openai` client.

A benchmark, not a test. Starts `qlora serve MODEL` (or uses a server already running at --url), then for
each number of concurrent clients sends --requests chat completions (the shipped benchmark questions,
greedy, --max-tokens each; streamed with --stream) and prints, per client count: requests per second,
generated tokens per second (from the server's usage counts), latency percentiles (time to first token too
when streaming), and each figure's ratio to the one-client run. The server batches concurrent replies
(continuous batching), so more clients should raise throughput more than latency. The machine's load
average and CPU are printed with the figures: on a shared CPU the load moves them.

    python scripts/bench_serve.py runs/quickstart [--clients 1,4,8,16] [--requests 16] [--max-tokens 64] [--stream]

The server inherits OMP_NUM_THREADS. On a quiet 2-core CPU, 2 serves a merged model fastest and 1 a 4-bit
run (bitsandbytes' CPU path); on a CPU shared with other jobs, 1 (README, "Serving many clients").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen | None) -> float:
    """Seconds until GET /health answers (the model is loaded)."""
    started = time.perf_counter()
    health = url.removesuffix("/v1") + "/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            with opener.open(health, timeout=5):
                return time.perf_counter() - started
        except OSError:
            time.sleep(0.5)


def one_request(client, model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    started = time.perf_counter()
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        response = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
        return {"seconds": time.perf_counter() - started, "tokens": response.usage.completion_tokens, "first": None}
    first, tokens = None, 0
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "first": first}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(client, model: str, prompts: list[str], clients: int, max_tokens: int, stream: bool) -> dict:
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda p: one_request(client, model, p, max_tokens, stream), prompts))
    seconds = time.perf_counter() - started
    latencies = [r["seconds"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    entry = {
        "clients": clients, "requests": len(results), "seconds": round(seconds, 2),
        "requests_per_second": round(len(results) / seconds, 3), "generated_tokens": tokens,
        "generated_tokens_per_second": round(tokens / seconds, 1),
        "latency_p50_s": round(statistics.median(latencies), 2), "latency_p95_s": round(percentile(latencies, 0.95), 2),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if stream:
        firsts = [r["first"] for r in results if r["first"] is not None]
        entry["first_token_p50_s"] = round(statistics.median(firsts), 2) if firsts else None
    return entry


def add_ratios(runs: list[dict]) -> None:
    """Each run's throughput and latency as multiples of the one-client run's (when there is one)."""
    single = next((run for run in runs if run["clients"] == 1), None)
    if single is None:
        return
    for run in runs:
        run["vs_one_client"] = {
            "generated_tokens_per_second": round(run["generated_tokens_per_second"] / single["generated_tokens_per_second"], 2),
            "requests_per_second": round(run["requests_per_second"] / single["requests_per_second"], 2),
            "latency_p50": round(run["latency_p50_s"] / single["latency_p50_s"], 2),
        }


def machine() -> dict:
    """The CPU the figures come from: its model name, whether it has native bfloat16, its core count."""
    name = "unknown"
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    return {"cpu": name, "avx512_bf16": "avx512_bf16" in flags.split(), "cpu_count": os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}  # the server inherits it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct", help="What `qlora serve` serves.")
    parser.add_argument("--url", help="Use a server already running here (http://host:port/v1) instead of starting one.")
    parser.add_argument("--model-name", help="The served model id (default: the one /v1/models lists).")
    parser.add_argument("--clients", default="1,4,8,16", help="Comma-separated numbers of concurrent clients.")
    parser.add_argument("--requests", type=int, default=16, help="Requests per client count.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--server-args", default="", help="Extra `qlora serve` arguments, e.g. '--max-batch 8'.")
    args = parser.parse_args()

    import openai

    from qlora_cli.evaluation.questions import read_questions

    process, url = None, args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        process = subprocess.Popen([sys.executable, "-m", "qlora_cli", "serve", *args.model.split(","), "--port", str(port),
                                    *args.server_args.split()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        startup = wait_until_up(url, process)
        client = openai.OpenAI(base_url=url, api_key=os.environ.get("QLORA_SERVE_KEY", "unused"), max_retries=0,
                               timeout=3600)
        model = args.model_name or client.models.list().data[0].id
        questions = [q.turns[0] for q in read_questions(None)]
        prompts = (questions * (args.requests // len(questions) + 1))[: args.requests]
        one_request(client, model, prompts[0], 8, False)  # warm-up: first-call allocations are not the server's pace
        runs = []
        for clients in args.clients.split(","):
            runs.append(run_load(client, model, prompts, int(clients), args.max_tokens, args.stream))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # a figure kept if a later count is cut short
        add_ratios(runs)
        print(json.dumps({"model": model, "url": url, "startup_seconds": round(startup, 1), "stream": args.stream,
                          "max_tokens": args.max_tokens, **machine(), "runs": runs}, indent=2))
    finally:
        if process is not None:
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
