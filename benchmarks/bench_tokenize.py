"""Tokenization throughput of prepare_data.tokenize_docs: num_proc=1 vs num_proc=2 on the built-in corpus.

    python benchmarks/bench_tokenize.py [--repeats 3] [--mb 0]

Trains a 4096-token BPE tokenizer on the corpus once (a temp dir), then times the two settings
interleaved (1, 2, 1, 2, ...) so that load from other processes hits both alike, and prints the
median MB/s of each and their ratio. A third line times SentencePiece's own C++ thread pool
(`Tokenizer.encode_batch(num_threads=2)`) as an outside reference for what two cores can give.
Process start-up and pickling the token arrays back are inside the num_proc=2 time on purpose:
that is what prepare_data.py pays. CPU seconds are printed too: on a machine shared with other
jobs the wall-clock ratio depends on their load, the CPU cost of the work does not. Nothing is asserted.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prepare_data import DataConfig, clean, iter_source, tokenize_docs  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mb", type=float, default=0.0, help="cap on corpus MB (0 = the whole built-in corpus)")
    args = ap.parse_args()

    docs, counts = clean(iter_source(DataConfig(max_mb=args.mb)), DataConfig())
    n_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"corpus: {len(docs)} docs, {n_mb:.2f} MB (removed {counts['read'] - counts['kept']} of {counts['read']})")
    with tempfile.TemporaryDirectory() as tmp:
        sample = os.path.join(tmp, "sample.txt")
        with open(sample, "w", encoding="utf-8") as fh:
            fh.write("\n".join(docs))
        tok = train_tokenizer([sample], tmp, vocab_size=4096, verbose=False)

        def timed(fn):
            """(wall seconds, CPU seconds of this process and its workers, fn's result)."""
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, cpu_seconds() - cpu0, out

        runs = {
            "num_proc=1": lambda: sum(len(ids) for ids in tokenize_docs(docs, tmp, 1)),
            "num_proc=2": lambda: sum(len(ids) for ids in tokenize_docs(docs, tmp, 2)),
            # + 2 per document: the BOS/EOS framing tokenize_docs adds, so the counts match.
            "sentencepiece num_threads=2": lambda: sum(len(ids) + 2 for ids in tok.encode_batch(docs, num_threads=2)),
        }
        wall = {k: [] for k in runs}
        cpu = {k: [] for k in runs}
        runs["num_proc=1"]()  # warm-up: page cache, first SentencePiece load
        load = os.getloadavg()[0]
        for _ in range(args.repeats):
            counts = set()
            for name, fn in runs.items():
                dt, dcpu, n_tokens = timed(fn)
                wall[name].append(dt)
                cpu[name].append(dcpu)
                counts.add(n_tokens)
            assert len(counts) == 1  # the same work in every path

    bpt = n_mb * 1e6 / (n_tokens - 2 * len(docs))
    load = max(load, os.getloadavg()[0])
    print(f"tokens: {n_tokens:,} ({bpt:.2f} bytes/token); cpus: {os.cpu_count()}, load average up to {load:.1f}")
    if load > os.cpu_count():
        print("warning: the machine is busier than it has cores; the wall-clock ratio understates num_proc=2")
    med = {k: statistics.median(v) for k, v in wall.items()}
    for name, dt in med.items():
        print(
            f"{name:<28} {dt:6.2f} s wall {statistics.median(cpu[name]):6.2f} s cpu  {n_mb / dt:6.2f} MB/s  "
            f"{n_tokens / dt / 1e6:5.2f} M tok/s  (median of {args.repeats})"
        )
    print(f"speedup num_proc=2 / num_proc=1: {med['num_proc=1'] / med['num_proc=2']:.2f}x")
    print(
        f"speedup sentencepiece threads=2 / num_proc=1: {med['num_proc=1'] / med['sentencepiece num_threads=2']:.2f}x"
    )


if __name__ == "__main__":
    main()
