"""Tests for prepare_data.py: shard format, cleaning counts, sources, the pipeline, and TokenStream.

References are independent of the code under test: numpy arrays written by hand, windows cut from
those arrays with plain slicing, counts worked out for a hand-made corpus, and the tokenizer's own
encode() of each document.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from config import UserError
from prepare_data import DataConfig, clean, iter_source, normalize, prepare, split_train_val, stdlib_files
from shards import ShardWriter, TokenStream, read_shard, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-token BPE tokenizer trained once on ~300 KB of standard library text."""
    from tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    sample = out / "sample.txt"
    text = "".join(open(f, encoding="utf-8").read() for f in stdlib_files()[:40])[:300_000]
    sample.write_text(text, encoding="utf-8")
    return train_tokenizer([str(sample)], str(out), vocab_size=512, verbose=False)


# ----------------------------------------------------------------------------- shard format


@pytest.mark.parametrize("high", [4096, 200_000])  # uint16, and uint32 for a vocabulary past 65536
def test_shard_round_trip(tmp_path, high):
    ids = np.random.default_rng(0).integers(0, high, size=1000)
    path = str(tmp_path / "train_000.bin")
    write_shard(path, ids)
    back = read_shard(path)
    assert back.dtype == (np.uint16 if high <= 65536 else np.uint32)
    np.testing.assert_array_equal(np.asarray(back, dtype=np.int64), ids)
    assert os.path.getsize(path) == 32 + ids.size * back.dtype.itemsize  # 32-byte header, nothing else


def test_shard_writer_splits_files(tmp_path):
    ids = np.arange(2500) % 700
    writer = ShardWriter(str(tmp_path), "train", np.uint16, shard_tokens=1024)
    for piece in np.array_split(ids, 7):  # chunks that do not line up with shard boundaries
        writer.write(piece)
    paths = writer.close()
    assert [os.path.basename(p) for p in paths] == ["train_000.bin", "train_001.bin", "train_002.bin"]
    assert [len(read_shard(p)) for p in paths] == [1024, 1024, 452]
    np.testing.assert_array_equal(np.concatenate([read_shard(p) for p in paths]), ids)


def test_truncated_shard_refused(tmp_path):
    path = tmp_path / "train_000.bin"
    write_shard(str(path), np.arange(100))
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # a copy interrupted one byte short
    with pytest.raises(ValueError, match=r"train_000\.bin: truncated"):
        read_shard(str(path))
    path.write_bytes(data + b"\0\0")  # trailing bytes are as wrong as missing ones
    with pytest.raises(ValueError, match=r"train_000\.bin: longer than its header"):
        read_shard(str(path))


@pytest.mark.parametrize(
    "content",
    [
        np.arange(100, dtype=np.uint16).tobytes(),  # a bare nanoGPT-style token file, no header
        b"hello world, this is a text file and not a shard at all\n",
        b"Z2S",  # shorter than the header
        b"",
    ],
)
def test_foreign_file_refused(tmp_path, content):
    path = tmp_path / "val_000.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"val_000\.bin: not a token shard"):
        read_shard(str(path))


# ----------------------------------------------------------------------------- cleaning


def test_normalize_nfc_newlines_controls():
    assert normalize("Cafe\u0301") == "Caf\u00e9"  # decomposed e + combining acute -> one code point
    assert normalize("\u212b") == "\u00c5"  # ANGSTROM SIGN -> its canonical A-ring (NFC, not NFKC)
    assert normalize("\ufb01") == "\ufb01"  # the fi ligature is a compatibility form: NFC keeps it
    assert normalize("a\r\nb\rc\n") == "a\nb\nc"
    assert normalize("x\x00y\x1bz\x7f\x85w\tv") == "xyzw\tv"  # controls gone, tab kept
    assert normalize("  \n padded \n ") == "padded"


def test_filter_and_dedup_counts():
    prose = "The quick brown fox jumps over the lazy dog, again and again, by the river bank. "
    corpus = [
        "",  # empty
        " \n\t \r\n",  # empty after normalizing
        "too short",  # too_short (< 64 chars)
        prose * 2,  # kept
        prose * 2,  # duplicate
        (prose * 2).replace("\n", "\r\n") + "\r\n",  # duplicate once normalized (trailing newline stripped)
        "Cafe\u0301 " + prose,  # kept
        "Caf\u00e9 " + prose,  # duplicate: the same text in NFC
        "0x1f, 0x2e, 0x3d, 0x4c, 0x5b, 0x6a, 0x79, 0x88, 0x97, 0xa6, 0xb5, 0xc4, 0xd3, 0xe2",  # non_text
        prose * 40,  # too_long (3280 chars)
        "\x00\x01" + prose,  # kept: controls removed, then unique
    ]
    cfg = DataConfig(min_chars=64, max_chars=3000, min_text_fraction=0.65)
    docs, counts = clean(corpus, cfg)
    assert counts == {
        "read": 11,
        "empty": 2,
        "too_short": 1,
        "too_long": 1,
        "non_text": 1,
        "duplicate": 3,
        "kept": 3,
    }
    assert docs == [(prose * 2).strip(), "Caf\u00e9 " + prose.strip(), prose.strip()]


def test_val_split_by_hash():
    docs = [f"document number {i} " * 5 for i in range(2000)]
    train, val = split_train_val(docs, 0.1, seed=0)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 150 < len(val) < 250  # ~10%, binomial spread
    # The side a document lands on depends on its text, not on its position or its neighbours.
    _, val_rev = split_train_val(docs[::-1], 0.1, seed=0)
    assert set(val_rev) == set(val)
    _, val_seed = split_train_val(docs, 0.1, seed=1)
    assert set(val_seed) != set(val)


# ----------------------------------------------------------------------------- sources


def test_local_txt_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nstill the first\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second document\n", encoding="utf-8")
    docs = list(iter_source(DataConfig(source=str(tmp_path / "*.txt"))))
    assert docs == ["first document\nstill the first\n", "second document\n"]
    lines = list(iter_source(DataConfig(source=str(tmp_path / "*.txt"), txt_sample_by="line")))
    assert lines == ["first document", "still the first", "second document"]

    rows = [{"content": "alpha", "id": 1}, {"content": "beta \u00e9", "id": 2}, {"content": None, "id": 3}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert list(iter_source(DataConfig(source=str(jsonl), text_field="content"))) == ["alpha", "beta \u00e9", ""]
    assert list(iter_source(DataConfig(source=str(jsonl), text_field="content", max_docs=2))) == [
        "alpha",
        "beta \u00e9",
    ]
    with pytest.raises(UserError, match="no column 'text'"):
        list(iter_source(DataConfig(source=str(jsonl))))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl line 2: not valid JSON"):
        list(iter_source(DataConfig(source=str(bad))))
    with pytest.raises(UserError, match="matches no file"):
        list(iter_source(DataConfig(source=str(tmp_path / "*.parquet"))))
    (tmp_path / "d.csv").write_text("x\n", encoding="utf-8")
    with pytest.raises(UserError, match="unsupported file type"):
        list(iter_source(DataConfig(source=str(tmp_path / "d.csv"))))


def test_builtin_source_is_stdlib():
    files = stdlib_files()
    assert len(files) > 300 and all(f.endswith(".py") for f in files)
    assert not any(os.sep + "test" in f or "site-packages" in f for f in files)
    first = next(iter_source(DataConfig(max_docs=1)))
    assert first == open(files[0], encoding="utf-8").read()


# ----------------------------------------------------------------------------- the whole pipeline


def test_prepare_end_to_end(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    texts = [open(f, encoding="utf-8").read() for f in stdlib_files()[40:70]]
    rows = [{"text": t} for t in texts] + [{"text": texts[0]}, {"text": ""}]  # one duplicate, one empty
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "ds"
    cfg = DataConfig(source=str(src), out_dir=str(out), tokenizer=tok_dir(tok, tmp_path), num_proc=2, tasks=False)
    cfg.val_fraction, cfg.min_text_fraction = 0.2, 0.0
    meta = prepare(cfg)

    docs, _ = clean(texts, cfg)  # reference documents: every unique non-empty text, normalized
    train, val = split_train_val(docs, 0.2, seed=0)
    assert meta["removed"]["duplicate"] == 1 and meta["removed"]["empty"] == 1
    assert meta["removed"]["kept"] == len(docs) == meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"]
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["dtype"] == "uint16"
    for name, split_docs in (("train", train), ("val", val)):
        expected = [i for d in split_docs for i in [tok.bos_id, *tok.encode(d), tok.eos_id]]
        got = np.concatenate([read_shard(str(out / s)) for s in meta["splits"][name]["shards"]])
        np.testing.assert_array_equal(got, expected)
        n_bytes = sum(len(d.encode("utf-8")) for d in split_docs)
        if name == "train":  # compression over text tokens only (no BOS/EOS)
            assert meta["bytes_per_token"] == pytest.approx(n_bytes / (len(expected) - 2 * len(split_docs)), abs=1e-4)
        else:  # what bits-per-byte of a val loss needs: every token the loss averages over
            assert meta["val_bytes_per_token"] == pytest.approx(n_bytes / len(expected), abs=1e-4)
    assert set(os.listdir(out)) >= {"tokenizer.model", "tokenizer_config.json", "meta.json", "train_000.bin"}
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # the temporary build dir was renamed away

    # The same settings again: nothing is rebuilt. Other settings: refused unless overwrite=true.
    mtime = os.path.getmtime(out / "train_000.bin")
    assert prepare(cfg)["tokenizer_sha256"] == tok.sha256 and os.path.getmtime(out / "train_000.bin") == mtime
    cfg.val_fraction = 0.3
    with pytest.raises(UserError, match="already exists"):
        prepare(cfg)
    cfg.overwrite = True
    assert prepare(cfg)["config"]["val_fraction"] == 0.3


def tok_dir(tok, tmp_path):
    path = tmp_path / "given_tok"
    tok.save(str(path))
    return str(path)


# ----------------------------------------------------------------------------- TokenStream


def _make_stream_dir(tmp_path, lengths=(301, 200)):
    """Shards whose token at stream position p is p % 60000: every window is recognisable."""
    tokens, start = [], 0
    for i, n in enumerate(lengths):
        tokens.append(np.arange(start, start + n) % 60000)
        write_shard(str(tmp_path / f"train_{i:03d}.bin"), tokens[-1])
        start += n
    return tokens


def _reference_rows(tokens, T):
    """Rows cut directly from the arrays: windows of T+1 at stride T, never across a shard."""
    return [t[j * T : j * T + T + 1] for t in tokens for j in range((len(t) - 1) // T)]


def test_rank_split_covers_stream_exactly_once(tmp_path):
    T = 10
    tokens = _make_stream_dir(tmp_path, lengths=(241, 161))  # 24 + 16 = 40 rows
    rows = {tuple(r) for r in _reference_rows(tokens, T)}
    one = TokenStream(str(tmp_path), "train", batch_size=8, seq_len=T, seed=3)
    ranks = [TokenStream(str(tmp_path), "train", batch_size=4, seq_len=T, rank=r, world_size=2, seed=3) for r in (0, 1)]
    assert one.n_rows == len(rows) == 40 and one.batches_per_epoch == ranks[0].batches_per_epoch == 5
    seen = []
    for _ in range(one.batches_per_epoch):
        x1, y1 = one.next_batch()
        (x0, y0), (xr, yr) = ranks[0].next_batch(), ranks[1].next_batch()
        assert x0.shape == (4, T) and x1.shape == (8, T)
        np.testing.assert_array_equal(np.concatenate([x0, xr]), x1.numpy())  # world 2 = world 1, split by rows
        np.testing.assert_array_equal(np.concatenate([y0, yr]), y1.numpy())
        seen += [tuple(np.concatenate([x, y[-1:]])) for x, y in zip(x1.numpy(), y1.numpy(), strict=True)]
    assert len(seen) == len(set(seen)) and set(seen) == rows  # every row exactly once in the epoch


def test_resume_is_exact(tmp_path):
    _make_stream_dir(tmp_path)  # (300 + 199) // 16 -> 18 + 12 = 30 rows; 5 batches of 6 per epoch
    kw = dict(batch_size=3, seq_len=16, rank=1, world_size=2, seed=7)
    ref = TokenStream(str(tmp_path), "train", **kw)
    expected = [ref.next_batch() for _ in range(13)]  # crosses two epoch boundaries

    run = TokenStream(str(tmp_path), "train", **kw)
    for _ in range(4):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores: plain JSON ints
    assert all(type(v) is int for v in state.values())
    resumed = TokenStream(str(tmp_path), "train", **kw)
    resumed.load_state_dict(state)
    for x_ref, y_ref in expected[4:]:
        x, y = resumed.next_batch()
        assert x.equal(x_ref) and y.equal(y_ref)
    with pytest.raises(ValueError, match="seed=7"):
        TokenStream(str(tmp_path), "train", **dict(kw, seed=8)).load_state_dict(state)


def test_stream_batches_and_epochs(tmp_path):
    tokens = _make_stream_dir(tmp_path)
    rows = _reference_rows(tokens, 16)
    s = TokenStream(str(tmp_path), "train", batch_size=6, seq_len=16, seed=0)
    epochs = [[s.next_batch() for _ in range(s.batches_per_epoch)] for _ in range(2)]
    for x, y in epochs[0]:
        assert x.dtype == y.dtype and str(x.dtype) == "torch.int64" and x.shape == y.shape == (6, 16)
        assert x[:, 1:].equal(y[:, :-1])  # y is x shifted by one
        for xi, yi in zip(x.numpy(), y.numpy(), strict=True):
            assert any(np.array_equal(np.append(xi, yi[-1]), r) for r in rows)  # a real window of the text
    order = [tuple(b[0][:, 0].tolist()) for b in epochs[0]], [tuple(b[0][:, 0].tolist()) for b in epochs[1]]
    assert order[0] != order[1]  # each epoch is shuffled anew...
    again = TokenStream(str(tmp_path), "train", batch_size=6, seq_len=16, seed=0)
    assert all(again.next_batch()[0].equal(x) for x, _ in epochs[0])  # ...deterministically
    val = TokenStream(str(tmp_path), "train", batch_size=6, seq_len=16, shuffle=False)
    assert val.next_batch()[0][:, 0].tolist() == [r[0] for r in rows[:6]]  # unshuffled = file order
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TokenStream(str(tmp_path), "train", batch_size=64, seq_len=16)
    with pytest.raises(ValueError, match="no val_"):
        TokenStream(str(tmp_path), "val", batch_size=1, seq_len=16)


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "args, message",
    [
        (["num_proc=0"], "num_proc must be >= 1"),
        (["vocab_sise=100"], "did you mean 'vocab_size'"),
        (["source=/no/such/dir/*.txt", "out_dir=OUT"], "matches no file"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "prepare_data.py"), *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
