"""Text in, token shards out: the data pipeline for pretraining, and the batch reader training uses.

    python prepare_data.py                                   # built-in offline corpus -> data/builtin/
    python prepare_data.py configs/data_tinystories.yaml     # a Hugging Face hub dataset (needs internet)
    python prepare_data.py source='my_texts/*.jsonl' out_dir=data/mine text_field=content
    python prepare_data.py --help                            # every key

Sources (`source=`):
- `builtin` (default, offline): the running Python's standard library source files, comments and
  docstrings included: ~11 MB of real human-written English and code on every machine with Python.
- `hf:NAME` a hub dataset through `datasets.load_dataset` (split, text field, optional streaming).
- a local path or glob of `.txt`, `.jsonl`/`.json` or `.parquet` files, read by the same `datasets` API.

Pipeline, with how many documents each step removed printed and saved in meta.json:
    normalize (Unicode NFC, control characters, newlines) -> filter (empty, too short, too long,
    mostly non-text) -> exact dedup by hash -> train/val split by document hash -> train the
    tokenizer on the train docs (unless one is given) -> tokenize in parallel -> shards.
The cleaned documents are held in memory until they are tokenized: fine for a few GB of text;
cap a bigger source with max_docs / max_mb (and streaming=true for a hub dataset).
The filters are the cheapest of the Gopher rules (Rae et al. 2021, "Scaling Language Models",
appendix A); exact dedup by content hash is the first step of every modern pipeline (Lee et al.
2022, "Deduplicating Training Data Makes Language Models Better").

Output directory (written to a temporary name and renamed into place, never overwritten unless
`overwrite=true`):
    tokenizer.model, tokenizer_config.json     the SentencePiece tokenizer (tokenizer.py)
    train_000.bin ..., val_000.bin             token shards, see "Shard format" below
    meta.json                                  counts, tokenizer sha256, source, vocab, bytes/token
    sft_train.jsonl, dpo_train.jsonl, test.jsonl   the built-in tasks (tasks.py), when present

Shard format (shards.py): a 32-byte little-endian header -- magic b"Z2STOKEN", format version (u32), bytes
per token (u32: 2 or 4), token count (u64), 8 reserved bytes -- then the tokens as uint16 (uint32
when the vocabulary does not fit in 16 bits). Every document is framed as BOS ... EOS and the
documents are concatenated, so a training window may span a document boundary (as in GPT-2) and
the model learns what a boundary looks like. The header makes a truncated or foreign file an error
instead of silent garbage: nanoGPT's bare .bin files cannot tell.

`TokenStream` reads shards through np.memmap (the OS pages data in; nothing is loaded up front)
and yields (x, y) batches. Its whole position is a few plain ints, so training resumes on exactly
the batch it would have seen, and under data parallelism every rank takes its own rows of each
global batch, so the ranks together see the stream exactly once.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sysconfig
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

import tasks
from config import UserError, run_cli, to_dict
from shards import VERSION, ShardWriter, token_dtype
from tokenizer import Tokenizer, train_tokenizer

# ----------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin | hf:NAME (hub dataset) | local file or glob (.txt, .jsonl, .json, .parquet)
    out_dir: str = "data/builtin"  # output directory (refused if it exists with other settings, see overwrite)
    overwrite: bool = False  # replace an existing out_dir
    hf_config: str = ""  # hub dataset configuration name, e.g. wikitext-103-raw-v1
    split: str = "train"  # hub dataset split to read
    text_field: str = "text"  # column holding the text (hub, .jsonl and .parquet sources)
    streaming: bool = False  # stream a hub dataset instead of downloading it whole (use with max_docs/max_mb)
    txt_sample_by: str = "document"  # .txt files: one document per file, line or paragraph
    max_docs: int = 0  # stop reading after this many documents (0 = no limit)
    max_mb: float = 0.0  # stop reading after this many MB of raw text (0 = no limit)
    min_chars: int = 64  # drop documents shorter than this after normalizing
    max_chars: int = 1_000_000  # drop documents longer than this (a dump, a data table)
    min_text_fraction: float = 0.65  # drop documents where letters+whitespace are below this fraction
    val_fraction: float = 0.02  # share of documents held out for validation (chosen by content hash)
    seed: int = 0  # salts the validation hash, so another seed holds out other documents
    tokenizer: str = ""  # existing tokenizer (dir or .model file); empty = train one on the train docs
    vocab_size: int = 4096  # vocabulary of the trained tokenizer
    model_type: str = "bpe"  # trained tokenizer's algorithm: bpe | unigram
    tokenizer_train_mb: float = 16.0  # MB of train text (from the start) the tokenizer is trained on
    num_proc: int = 2  # tokenizer worker processes
    shard_tokens: int = 100_000_000  # tokens per shard file
    tasks: bool = True  # also write the built-in SFT/DPO/test tasks (tasks.py) into out_dir
    sft_rows: int = 3000  # built-in SFT training chats (distinct expressions; the 300 test rows never change)
    test_extra_rows: int = 0  # held-out tasks in test_extra.jsonl besides test.jsonl's (no other row changes)

    def validate(self) -> list[str]:
        checks = [
            (self.source != "", "source must not be empty (builtin, hf:NAME or a file path/glob)"),
            (self.out_dir != "", "out_dir must not be empty"),
            (0 <= self.min_chars < self.max_chars, "need 0 <= min_chars < max_chars"),
            (0 <= self.min_text_fraction <= 1, f"min_text_fraction must be in [0, 1], got {self.min_text_fraction}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.max_docs >= 0 and self.max_mb >= 0, "max_docs and max_mb must be >= 0 (0 = no limit)"),
            (self.tokenizer_train_mb > 0, f"tokenizer_train_mb must be > 0, got {self.tokenizer_train_mb}"),
            (self.num_proc >= 1, f"num_proc must be >= 1, got {self.num_proc}"),
            (self.sft_rows >= 3, f"sft_rows must be >= 3 (one per family), got {self.sft_rows}"),
            (self.test_extra_rows >= 0, f"test_extra_rows must be >= 0, got {self.test_extra_rows}"),
            (self.shard_tokens >= 1024, f"shard_tokens must be >= 1024, got {self.shard_tokens}"),
            (self.vocab_size >= 512, f"vocab_size must be >= 512 (bytes + specials), got {self.vocab_size}"),
            (self.model_type in ("bpe", "unigram"), f"model_type must be bpe or unigram, got {self.model_type!r}"),
            (self.txt_sample_by in ("document", "line", "paragraph"), "txt_sample_by: document|line|paragraph"),
            (not self.tokenizer or os.path.exists(self.tokenizer), f"tokenizer not found: {self.tokenizer}"),
        ]
        return [msg for ok, msg in checks if not ok]


# ----------------------------------------------------------------------------- sources


def stdlib_files() -> list[str]:
    """The standard library's .py files in a fixed order, without tests and installed packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's order, which otherwise follows the file system.
        dirnames[:] = sorted(d for d in dirnames if "test" not in d and d not in ("site-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test")]
    return files


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:  # a stray bad byte becomes U+FFFD
        return fh.read()


def _local_files(pattern: str) -> tuple[str, list[str]]:
    """A path or glob -> (datasets builder name, sorted files). Mixed or unknown types are refused."""
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise UserError(f"source '{pattern}' matches no file (use builtin, hf:NAME or a path/glob)")
    builders = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    kinds = {builders.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if os.path.splitext(f)[1].lower() not in builders)
        raise UserError(f"{bad}: unsupported file type (use .txt, .jsonl, .json or .parquet)")
    if len(kinds) > 1:
        raise UserError(f"source '{pattern}' mixes file types {sorted(kinds)}; give one type per run")
    return kinds.pop(), files


def _check_json_lines(files: list[str]) -> None:
    """Raise UserError at the first line of a .jsonl file that is not UTF-8 text or not a JSON object."""
    for path in files:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path} line {n}: not UTF-8 text") from None
                try:
                    ok = not line.strip() or isinstance(json.loads(line), dict)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
                if not ok:
                    raise UserError(f'{path} line {n}: expected a JSON object like {{"text": ...}}')


def iter_source(cfg: DataConfig) -> Iterator[str]:
    """Raw documents from cfg.source, in a deterministic order, up to max_docs / max_mb."""
    files: list[str] = []
    if cfg.source == "builtin":
        rows: Iterable = ({"text": _read_text(f)} for f in stdlib_files())
        field = "text"
    else:
        import datasets  # imported here: slow to import, and the built-in source does not need it
        import huggingface_hub

        # Quiet: progress bars and retry warnings would bury the one-line error a user needs.
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        datasets.disable_progress_bars()
        huggingface_hub.utils.logging.set_verbosity_error()
        field, builder = cfg.text_field, ""
        try:
            if cfg.source.startswith("hf:"):
                rows = datasets.load_dataset(
                    cfg.source[3:], cfg.hf_config or None, split=cfg.split, streaming=cfg.streaming
                )
            else:
                builder, files = _local_files(cfg.source)
                # Text files: a stray bad byte becomes U+FFFD (counted in _build), as for the built-in source.
                extra = {"sample_by": cfg.txt_sample_by, "encoding_errors": "replace"} if builder == "text" else {}
                rows = datasets.load_dataset(builder, data_files=files, split="train", **extra)
                field = "text" if builder == "text" else field
        except UserError:
            raise
        except Exception as e:  # datasets raises many types; the user needs one line, not a traceback
            if builder == "json":
                _check_json_lines(
                    [f for f in files if f.endswith(".jsonl")]
                )  # names the file and line when a row is not JSON
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"source '{cfg.source}' could not be read: {msg}") from None
        columns = getattr(rows, "column_names", None)
        if columns is not None and field not in columns:
            raise UserError(f"source '{cfg.source}' has no column '{field}' (columns: {columns}); set text_field=")
    n_bytes = 0
    rows = iter(rows)
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except UnicodeDecodeError as e:  # JSON strings with bytes that are not UTF-8 (pyarrow fails on reading them)
            _check_json_lines([f for f in files if f.endswith(".jsonl")])  # names the file and line
            raise UserError(f"source '{cfg.source}' row {i}: not UTF-8 text ({e.reason})") from None
        if (cfg.max_docs and i >= cfg.max_docs) or (cfg.max_mb and n_bytes >= cfg.max_mb * 1e6):
            return
        if field not in row:  # a streamed dataset has no column list up front
            raise UserError(f"source '{cfg.source}' row {i} has no '{field}' (has {list(row)}); set text_field=")
        text = row[field]
        if text is not None and not isinstance(text, str):
            raise UserError(f"source '{cfg.source}' row {i}: '{field}' is {type(text).__name__}, not text")
        text = text or ""
        n_bytes += len(text.encode("utf-8"))
        yield text


# ----------------------------------------------------------------------------- cleaning

# Control characters (Unicode category Cc) other than newline and tab carry no text and confuse
# tokenizers; \r is mapped to \n first so that Windows and old Mac line ends survive as newlines.
_DROP_CONTROLS = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)])  # all of Cc but \t \n


def normalize(text: str) -> str:
    """NFC, one newline convention, no control characters, no surrounding whitespace."""
    text = unicodedata.normalize("NFC", text)  # one code point sequence per visible string (e + ´ -> é)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.translate(_DROP_CONTROLS).strip()


def filter_reason(text: str, cfg: DataConfig) -> str | None:
    """Why a normalized document is dropped (a key of the removal counts), or None to keep it."""
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    # Letters + whitespace: prose and code are well above 0.65, hex dumps and lookup tables below.
    text_chars = sum(1 for c in text if c.isalpha() or c.isspace())
    if text_chars < cfg.min_text_fraction * len(text):
        return "non_text"
    return None


def clean(texts: Iterable[str], cfg: DataConfig) -> tuple[list[str], dict[str, int]]:
    """normalize -> filter -> exact dedup. Returns the kept documents and per-step removal counts."""
    counts = {"read": 0, "empty": 0, "too_short": 0, "too_long": 0, "non_text": 0, "duplicate": 0}
    seen: set[bytes] = set()
    kept = []
    for text in texts:
        counts["read"] += 1
        text = normalize(text)
        reason = filter_reason(text, cfg)
        if reason is None:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            reason = "duplicate" if digest in seen else None
            seen.add(digest)
        if reason is None:
            kept.append(text)
        else:
            counts[reason] += 1
    counts["kept"] = len(kept)
    return kept, counts


def is_val(text: str, val_fraction: float, seed: int = 0) -> bool:
    """Hold a document out by its content hash: the same text is always on the same side."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def split_train_val(docs: list[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    train, val = [], []
    for d in docs:
        (val if is_val(d, val_fraction, seed) else train).append(d)
    if val_fraction > 0 and not val and len(docs) > 1:
        val.append(train.pop())  # a tiny corpus still gets a validation document
    return train, val


# ----------------------------------------------------------------------------- tokenizing

_worker_tok = None  # each worker process loads its own tokenizer once (SentencePiece objects stay in-process)


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(tokenizer_path)


def _encode_chunk(docs: list[str]) -> np.ndarray:
    """Documents -> one array of BOS doc EOS BOS doc EOS ..."""
    tok = _worker_tok
    ids = []
    for d in docs:
        ids.append(tok.bos_id)
        ids.extend(tok.encode(d))
        ids.append(tok.eos_id)
    return np.asarray(ids, dtype=np.uint32)  # half the bytes of int64 to send back to the parent


def _chunks(docs: list[str], chunk_chars: int) -> Iterator[list[str]]:
    """Consecutive groups of documents of about `chunk_chars` characters: even work per task, whatever
    the document lengths (one 700 KB file among 2 KB ones would otherwise stall a worker)."""
    group, size = [], 0
    for d in docs:
        group.append(d)
        size += len(d)
        if size >= chunk_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def tokenize_docs(docs: list[str], tokenizer_path: str, num_proc: int = 1, chunk_chars=200_000) -> Iterator[np.ndarray]:
    """Encode documents in `num_proc` processes; yields token arrays in document order."""
    if num_proc == 1:  # same code path, no process start-up cost
        _init_worker(tokenizer_path)
        yield from map(_encode_chunk, _chunks(docs, chunk_chars))
        return
    # "spawn", not the Linux default "fork": forking a process that already runs threads (torch's OpenMP pool,
    # a gloo group) can copy a held lock into the child, which then waits on it forever.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        # imap keeps the order, so the shards do not depend on num_proc or on which worker is faster.
        yield from pool.imap(_encode_chunk, _chunks(docs, chunk_chars))


# ----------------------------------------------------------------------------- the pipeline


def _same_settings(a: dict, b: dict) -> bool:
    ignore = ("overwrite", "num_proc")  # these do not change what is written
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def prepare(cfg: DataConfig) -> dict:
    """Build the dataset directory cfg.out_dir (atomically) and return its meta.json contents."""
    out_dir = os.path.normpath(cfg.out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir} exists and is not a directory")
    if os.path.exists(out_dir) and not cfg.overwrite:
        meta_path, meta = os.path.join(out_dir, "meta.json"), {}
        if os.path.isfile(meta_path):
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
        if _same_settings(meta.get("config", {}), to_dict(cfg)):  # a re-run (make demo twice) is a no-op
            print(f"{out_dir} already holds this dataset (overwrite=true rebuilds it)")
            return meta
        raise UserError(f"out_dir {out_dir} already exists with other settings; pass overwrite=true to replace it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # Build next to the destination (same file system, so the final rename is atomic).
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the dataset is meant to be shared
    try:
        meta = _build(cfg, tmp)
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out_dir}")
    return meta


def _build(cfg: DataConfig, out: str) -> dict:
    t0 = time.time()
    # ---- read, normalize, filter, dedup ----
    docs, counts = clean(iter_source(cfg), cfg)
    removed = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("read", "kept"))
    print(f"read {counts['read']} documents; removed: {removed}; kept {counts['kept']} ({time.time() - t0:.1f}s)")
    # Bytes that were not UTF-8 were replaced by U+FFFD on reading: kept, but counted (meta.json bad_utf8_docs).
    bad_utf8 = sum("\ufffd" in d for d in docs)
    if bad_utf8:
        print(f"note: {bad_utf8} kept documents had bytes that are not UTF-8, replaced by U+FFFD")
    if not docs:
        raise UserError(f"source '{cfg.source}': no documents left after filtering (see min_chars, min_text_fraction)")
    splits = dict(zip(("train", "val"), split_train_val(docs, cfg.val_fraction, cfg.seed), strict=True))
    if not splits["train"]:
        raise UserError(f"source '{cfg.source}': every document went to validation; lower val_fraction")

    # ---- tokenizer: given, or trained on (a prefix of) the train documents only ----
    if cfg.tokenizer:
        tok = Tokenizer(cfg.tokenizer)
        tok.save(out)
    else:
        sample, budget = os.path.join(out, "tokenizer_train.txt"), cfg.tokenizer_train_mb * 1e6
        with open(sample, "w", encoding="utf-8") as fh:
            for d in splits["train"]:
                budget -= fh.write(d + "\n")
                if budget <= 0:
                    break
        try:
            tok = train_tokenizer([sample], out, vocab_size=cfg.vocab_size, model_type=cfg.model_type, verbose=False)
        except ValueError as e:  # e.g. a vocabulary too small for the byte pieces and special tokens
            raise UserError(f"tokenizer training: {e}") from None
        os.remove(sample)
        print(f"trained a {cfg.model_type} tokenizer, vocab {tok.vocab_size} ({time.time() - t0:.1f}s)")

    # ---- tokenize in parallel, write shards ----
    dtype = token_dtype(tok.vocab_size)
    stats = {}
    for name, split_docs in splits.items():
        writer = ShardWriter(out, name, dtype, cfg.shard_tokens)
        for ids in tokenize_docs(split_docs, out, cfg.num_proc):
            writer.write(ids)
        shards = [os.path.basename(p) for p in writer.close()]
        n_bytes = sum(len(d.encode("utf-8")) for d in split_docs)
        stats[name] = dict(docs=len(split_docs), tokens=writer.total, text_bytes=n_bytes, shards=shards)
        print(
            f"{name}: {len(split_docs)} docs, {n_bytes / 1e6:.2f} MB -> {writer.total:,} tokens ({time.time() - t0:.1f}s)"
        )
    train = stats["train"]
    # Compression counts text tokens only: the BOS/EOS framing adds 2 per document.
    bytes_per_token = train["text_bytes"] / max(train["tokens"] - 2 * train["docs"], 1)

    # ---- built-in tasks (tasks.py) ----
    if cfg.tasks:
        tasks.write_tasks(out, n_train=cfg.sft_rows, n_test_extra=cfg.test_extra_rows)
        print("wrote the built-in SFT/DPO/test tasks")

    meta = {
        "format_version": VERSION,
        "source": cfg.source,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "dtype": np.dtype(dtype).name,
        "removed": counts,
        "bad_utf8_docs": bad_utf8,
        "splits": stats,
        "bytes_per_token": round(bytes_per_token, 4),
        # For bits per byte of a val loss: the loss averages over every token, BOS/EOS included.
        "val_bytes_per_token": round(stats["val"]["text_bytes"] / max(stats["val"]["tokens"], 1), 4),
        "seconds": round(time.time() - t0, 1),
        "config": to_dict(cfg),
    }
    with open(os.path.join(out, "meta.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")
    print(f"bytes per token {bytes_per_token:.2f}; {train['tokens']:,} train tokens")
    return meta


def main(cfg: DataConfig) -> dict:
    return prepare(cfg)


if __name__ == "__main__":
    run_cli(main, DataConfig, __doc__)
