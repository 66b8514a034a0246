"""Shared pytest setup: the repo root on sys.path, and a small prepared dataset for training tests."""

import os
import random
import sys

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
