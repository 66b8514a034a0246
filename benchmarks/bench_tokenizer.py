"""Tokenizer benchmark: compression (BPE vs unigram) and encode throughput (ours vs transformers, 1 vs 2 threads).

    OMP_NUM_THREADS=1 python benchmarks/bench_tokenizer.py [--mb 2] [--vocab 4096]

Corpus: the running Python's standard library source (the repo's offline default). Held-out = every 50th line.
Throughput is measured interleaved (ours, reference, ours, ...) and reported as the median of repeats, as a ratio.
transformers is only the reference here (AutoTokenizer loading our tokenizer.model); it is not a runtime dependency.
"""

import argparse
import glob
import os
import statistics
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizer import train_tokenizer  # noqa: E402


def stdlib_lines(n_bytes: int) -> list[str]:
    lines, total = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh.read().splitlines():
                lines.append(line)
                total += len(line) + 1
        if total > n_bytes:
            break
    return lines


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=2.0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    lines = stdlib_lines(int(args.mb * 1e6))
    with tempfile.TemporaryDirectory() as d:
        corpus = os.path.join(d, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        n_bytes = os.path.getsize(corpus)
        print(f"corpus: {n_bytes / 1e6:.2f} MB, {len(lines)} lines, vocab {args.vocab}")
        toks = {}
        for model_type in ("bpe", "unigram"):
            t0 = time.perf_counter()
            toks[model_type] = tok = train_tokenizer(
                [corpus], os.path.join(d, model_type), args.vocab, model_type, verbose=False
            )
            r = tok.report
            print(
                f"{model_type:8s} train {time.perf_counter() - t0:6.1f} s   held-out bytes/token {r['bytes_per_token']:.3f}"
            )

        # ---- throughput: documents of ~20 lines, as prepare_data would feed them
        docs = ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
        doc_bytes = sum(len(x.encode()) for x in docs)
        tok = toks["bpe"]
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(tok.path)
        runs = {"ours_1thread": [], "ours_2threads": [], "hf_batch": []}
        for _ in range(args.repeats):  # interleaved so that machine noise hits all three alike
            runs["ours_1thread"].append(timed(lambda: tok.encode_batch(docs, num_threads=1)))
            runs["ours_2threads"].append(timed(lambda: tok.encode_batch(docs, num_threads=2)))
            runs["hf_batch"].append(timed(lambda: hf(docs, add_special_tokens=False)["input_ids"]))
        med = {k: statistics.median(v) for k, v in runs.items()}
        for k, v in med.items():
            print(f"{k:14s} {doc_bytes / v / 1e6:7.2f} MB/s  (median of {args.repeats})")
        print(f"ratio ours_1thread / hf_batch speed : {med['hf_batch'] / med['ours_1thread']:.2f}x")
        print(f"ratio ours 2 threads / 1 thread     : {med['ours_1thread'] / med['ours_2threads']:.2f}x")


if __name__ == "__main__":
    main()
