"""Shared pytest setup: the repo root on sys.path, a small prepared dataset for training tests, and `spawn` for
tests that run on several processes."""

import datetime
import os
import random
import socket
import sys
import tempfile
import time
import traceback

import pytest
import torch

# Triton fixes compiled-vs-interpreted mode when it is first imported, so decide before any test file
# imports it: without a GPU, the FlashAttention kernel runs in Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MICRO_MODEL = os.path.join(ROOT, "tests", "fixtures", "model_micro.yaml")

_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour"]
_VERBS = ["sees", "likes", "follows", "finds", "paints", "remembers", "carries"]
_OBJECTS = ["the red ball", "a green hat", "the long road", "a quiet river", "the open door", "a warm bread"]
_ENDS = ["every morning", "in the garden", "after dinner", "near the station", "without a word"]


def synthetic_corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    """Deterministic English-like documents from a small grammar: structure a tiny model can learn fast.

    Generated here rather than read from the standard library so that golden loss curves do not
    depend on the Python version.
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(4, 9)):
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDS)}."
            sentences.append(s[0].upper() + s[1:])
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """prepare_data.py run on the synthetic corpus: tokenizer (vocab 512), shards, built-in tasks."""
    from prepare_data import DataConfig, prepare

    root = tmp_path_factory.mktemp("data")
    src = root / "corpus"
    src.mkdir()
    for i, doc in enumerate(synthetic_corpus()):
        (src / f"doc{i:04d}.txt").write_text(doc + "\n")
    out = root / "prepared"
    cfg = DataConfig(
        source=str(src / "*.txt"), out_dir=str(out), vocab_size=512, val_fraction=0.05, num_proc=1, min_chars=32
    )
    prepare(cfg)
    return str(out)


# ---------------------------------------------------------------------------------------------------------------------
# several processes: ranks that never hang the suite
# ---------------------------------------------------------------------------------------------------------------------
SPAWN_TIMEOUT = 240  # seconds for one spawn, all ranks together; a healthy one takes a few seconds
COLLECTIVE_TIMEOUT = 60  # seconds a gloo collective may wait for a peer before it raises


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(rank, world, port, fn, args, error_dir):
    """One rank: join a gloo group whose collectives time out, run fn(info, *args), leave the group.

    No try/finally around fn: leaving the group starts with a barrier, and a rank that failed must not wait there
    for a peer that is itself waiting in a collective the failed rank will never join (the deadlock this avoids).
    The failed rank writes its traceback to error_dir/rankN.txt and exits at once; spawn() then kills the others."""
    import torch.distributed as dist

    import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    info = distributed.init_distributed()  # the group exists: this only reads it back as a DistInfo
    try:
        fn(info, *args)
    except BaseException:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    distributed.cleanup()


PEER_GONE = ("connection closed by peer", "connection reset by peer")  # gloo, in a rank whose peer has died


def _root_cause(error, error_dir: str, world: int):
    """When one rank raises, its peers' pending collectives fail a moment later ("Connection closed by peer"), and
    torch reports whichever exit it noticed first. If that is such a consequence, report a rank whose own error is
    not (each failed rank wrote its traceback to error_dir)."""
    import torch.multiprocessing as mp

    if not any(s in str(error).lower() for s in PEER_GONE):
        return error
    for rank in range(world):
        path = os.path.join(error_dir, f"rank{rank}.txt")
        if rank != error.error_index and os.path.isfile(path):
            with open(path) as fh:
                trace = fh.read()
            if not any(s in trace.lower() for s in PEER_GONE):
                return mp.ProcessRaisedException(f"\n\n-- Process {rank} failed first:\n{trace}", rank, 0)
    return error


def spawn(fn, *args, world: int = 2, timeout: float = SPAWN_TIMEOUT):
    """Run fn(info, *args) on `world` CPU ranks (gloo) and return when all have finished.

    Fails fast and never hangs: as soon as one rank exits non-zero the others are killed and that rank's traceback
    is raised here; after `timeout` seconds every rank is killed and TimeoutError raised. The free port is found
    before the ranks bind it, so a parallel test can take it in between; only that failure is retried."""
    import torch.multiprocessing as mp

    for attempt in range(3):
        error_dir = tempfile.mkdtemp(prefix="spawn_errors_")
        ctx = mp.start_processes(_launch, args=(world, _free_port(), fn, args, error_dir), nprocs=world, join=False,
                                 start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            # join() returns True once all exited cleanly; it raises (after killing the rest) when one failed.
            while not ctx.join(timeout=1.0, grace_period=1.0):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"{fn.__name__}: ranks still running after {timeout:.0f} s, killed")
            return
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise _root_cause(e, error_dir, world) from None
