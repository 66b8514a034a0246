"""Serving throughput and latency: serve.py under 1, 4 and 16 concurrent streaming clients.

Starts `python serve.py checkpoint=...` on a free 127.0.0.1 port (a separate process, as a user runs it), then for
each level of concurrency runs that many client threads, each sending chat requests with stream=true back to back,
and measures per request the time to the first streamed token (TTFT) and to the end. Reported per level:
  req/s      finished requests / wall time
  tok/s      generated tokens (usage.completion_tokens) / wall time
  TTFT p50 / p90, latency p50
and, as the reference, generation.generate called directly in this process on the same prompts (no HTTP).

What to expect: serve.py runs one request at a time (one worker thread, one KV cache per request), so tok/s stays
near the direct rate at every level while TTFT grows with the queue: ~ clients x one request's time. Batching
requests (continuous batching) is what would raise tok/s with concurrency; serve.py does not do it.

Run:  python benchmarks/bench_serve.py [--checkpoint out/sft] [--max-tokens 64] [--requests 16]
Numbers are printed, never asserted.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from generation import generate, load_for_inference, stop_ids_of  # noqa: E402

QUESTIONS = ["len('banana') = ?", "sorted([3, 1, 2]) = ?", "'abc'.upper() = ?", "What is 2 + 3?",
             "Say hello.", "max([4, 9, 2]) = ?", "Reverse 'abc'.", "Count to five."]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, question: str, max_tokens: int) -> dict:
    """One streamed chat request: {"ttft", "latency", "tokens"} (seconds, seconds, completion tokens)."""
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if ttft is None and '"content": "' in line and '"content": ""' not in line:
                ttft = time.perf_counter() - t0
            if '"usage"' in line and '"choices": []' in line:
                tokens = int(line.split('"completion_tokens": ')[1].split(",")[0])
    end = time.perf_counter() - t0
    return {"ttft": end if ttft is None else ttft, "latency": end, "tokens": tokens}


def level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads share `requests` requests; returns the row of the table."""
    results, lock, counter = [], threading.Lock(), iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            res = one_request(url, QUESTIONS[i % len(QUESTIONS)], max_tokens)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    return {"clients": clients, "requests": len(results), "req_s": len(results) / wall,
            "tok_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))], "lat_p50": statistics.median(r["latency"] for r in results)}  # fmt: skip


def direct(checkpoint: str, requests: int, max_tokens: int) -> dict:
    """The same greedy answers from generation.generate in this process, one request after another."""
    model, tok = load_for_inference(checkpoint, device="cpu")
    prompts = [tok.render_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], True)[0]
               for i in range(requests)]  # fmt: skip
    generate(model, [prompts[0]], 4, temperature=0.0)  # warm-up
    t0 = time.perf_counter()
    tokens = sum(len(generate(model, [p], max_tokens, temperature=0.0, stop_ids=stop_ids_of(tok))[0]) for p in prompts)
    wall = time.perf_counter() - t0
    return {"clients": "direct", "requests": requests, "req_s": requests / wall, "tok_s": tokens / wall,
            "ttft_p50": float("nan"), "ttft_p90": float("nan"), "lat_p50": wall / requests}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="out/sft")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server and the direct reference")
    args = ap.parse_args()
    if not os.path.isdir(args.checkpoint):
        sys.exit(f"no checkpoint at {args.checkpoint}: run `make sft` or pass --checkpoint DIR")
    torch.set_num_threads(args.threads)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"checkpoint={args.checkpoint}",
                               f"port={port}", "device=cpu"], env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # wait for the model to load (seconds on a loaded machine)
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        one_request(url, QUESTIONS[0], 4)  # warm-up
        rows = [level(url, int(c), args.requests, args.max_tokens) for c in args.levels.split(",")]
    finally:
        server.terminate()
        server.wait()
    rows.append(direct(args.checkpoint, args.requests, args.max_tokens))
    print(f"checkpoint {args.checkpoint}, max_tokens {args.max_tokens}, greedy, {args.threads} torch thread(s)")
    print("| clients | requests | req/s | tokens/s | TTFT p50 (s) | TTFT p90 (s) | latency p50 (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ttft = "| - | - |" if r["clients"] == "direct" else f"| {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} |"
        print(f"| {r['clients']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} {ttft} {r['lat_p50']:.3f} |")
    print(f"server tokens/s at 1 client / direct generate: {rows[0]['tok_s'] / rows[-1]['tok_s']:.2f}")


if __name__ == "__main__":
    main()
