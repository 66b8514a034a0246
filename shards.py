"""Token shards on disk and the batch reader that training uses (written by prepare_data.py).

Shard format: a 32-byte little-endian header -- magic b"Z2STOKEN", format version (u32), bytes
per token (u32: 2 or 4), token count (u64), 8 reserved bytes -- then the tokens as uint16 (uint32
when the vocabulary does not fit in 16 bits). The header makes a truncated or foreign file an error
that names it, instead of silent garbage.

`ExampleSampler` is the same idea for fine-tuning rows (SFT, DPO, GRPO): example indices in a seeded order
whose position is plain ints.

`TokenStream` reads shards through np.memmap (the OS pages data in; nothing is loaded up front)
and yields (x, y) batches. Its whole position is a few plain ints, so training resumes on exactly
the batch it would have seen, and under data parallelism every rank takes its own rows of each
global batch, so the ranks together see the stream exactly once.
"""

from __future__ import annotations

import glob
import os
import random
import struct

import numpy as np
import torch

from config import UserError

# ----------------------------------------------------------------------------- shard format

MAGIC = b"Z2STOKEN"
VERSION = 1
_HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes per token, token count, reserved -> 32 bytes
_DTYPES = {2: np.uint16, 4: np.uint32}


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _header(itemsize: int, count: int) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, itemsize, count)


class ShardWriter:
    """Appends tokens to NAME_000.bin, NAME_001.bin, ... of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: str, name: str, dtype, shard_tokens: int):
        self.out_dir, self.name, self.dtype, self.shard_tokens = out_dir, name, np.dtype(dtype), shard_tokens
        self.paths: list[str] = []
        self.total = 0
        self._fh, self._count = None, 0

    def write(self, tokens: np.ndarray) -> None:
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(tokens.max())} does not fit in {self.dtype.name}")
        while tokens.size:
            if self._fh is None:
                self.paths.append(os.path.join(self.out_dir, f"{self.name}_{len(self.paths):03d}.bin"))
                self._fh, self._count = open(self.paths[-1], "wb"), 0
                self._fh.write(_header(self.dtype.itemsize, 0))  # rewritten on close, once the count is known
            take = min(tokens.size, self.shard_tokens - self._count)
            self._fh.write(tokens[:take].astype(self.dtype).tobytes())
            self._count, self.total, tokens = self._count + take, self.total + take, tokens[take:]
            if self._count == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._fh.seek(0)
        self._fh.write(_header(self.dtype.itemsize, self._count))
        self._fh.close()
        self._fh = None

    def close(self) -> list[str]:
        if self._fh is not None:
            self._close_shard()
        return self.paths


def write_shard(path: str, tokens, dtype=None) -> None:
    """One shard file from an array of ids (uint16 unless an id needs uint32). For tests and small tools."""
    tokens = np.asarray(tokens)
    dtype = np.dtype(dtype or token_dtype(int(tokens.max()) + 1 if tokens.size else 0))
    with open(path, "wb") as fh:
        fh.write(_header(dtype.itemsize, tokens.size))
        fh.write(tokens.astype(dtype).tobytes())


def read_shard(path: str) -> np.memmap:
    """The tokens of one shard as a read-only memmap. Truncated or foreign files raise ValueError."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:8] != MAGIC:
        raise ValueError(f"{path}: not a token shard (no {MAGIC.decode()} header); run prepare_data.py to make one")
    _, version, itemsize, count = _HEADER.unpack(head)
    if version != VERSION or itemsize not in _DTYPES:
        raise ValueError(f"{path}: unsupported shard version {version} / token size {itemsize}")
    expected = _HEADER.size + count * itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ValueError(f"{path}: {what} ({size} bytes, header says {expected}); re-run prepare_data.py")
    if count == 0:
        return np.zeros(0, dtype=_DTYPES[itemsize])
    return np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=_HEADER.size, shape=(count,))


# ----------------------------------------------------------------------------- batch reader


class TokenStream:
    """Deterministic (x, y) batches from the `{split}_*.bin` shards of a prepared data directory.

    The stream is cut into rows of T+1 tokens taken at stride T (row j = tokens[jT : jT+T+1]), so
    every token is a target exactly once per epoch; rows never cross a shard boundary. Each epoch
    visits the rows in a permutation seeded by (seed, epoch) (train) or in file order (val).
    A global batch is `batch_size * world_size` consecutive rows of that order and rank r takes
    rows [r*B, (r+1)*B) of it: the ranks never overlap, and together they read exactly what one
    process with batch size B*world_size would. The rows left over at the end of an epoch
    (fewer than a global batch) are skipped.

    next_batch() -> x, y: LongTensor (B, T), y is x shifted left by one (y[:, t] = the token after x[:, t]).
    state_dict() -> {"epoch", "row", "seed", "n_rows"}: plain ints; load_state_dict() restores the
    exact position, so a resumed run reads the batches an uninterrupted one would.
    """

    def __init__(self, data_dir, split, batch_size, seq_len, rank=0, world_size=1, seed=0, shuffle=None):
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size, seq_len >= 1, 0 <= rank < world_size: {batch_size, seq_len, rank, world_size}"
            )
        paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
        if not paths:
            raise ValueError(f"{data_dir}: no {split}_*.bin shards; run prepare_data.py first")
        self.shards = [read_shard(p) for p in paths]
        self.B, self.T, self.rank, self.world_size, self.seed = batch_size, seq_len, rank, world_size, seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        rows_per_shard = [max(len(s) - 1, 0) // seq_len for s in self.shards]
        self._first_row = np.cumsum([0] + rows_per_shard)  # shard i holds rows [_first_row[i], _first_row[i+1])
        self.n_rows = int(self._first_row[-1])
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = self.n_rows // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{data_dir} {split}: {self.n_rows} rows of {seq_len + 1} tokens, fewer than one "
                f"global batch of {self.global_batch}; lower batch_size or seq_len"
            )
        self.epoch, self.row = 0, 0  # the whole position: epoch, and rows of its order already consumed
        self._order_epoch, self._order = -1, None

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:  # PCG64 seeded by (seed, epoch): the same order on every machine and rank
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            else:
                self._order = np.arange(self.n_rows)
            self._order_epoch = epoch
        return self._order

    def _row(self, j: int) -> np.ndarray:
        s = int(np.searchsorted(self._first_row, j, side="right")) - 1
        start = (j - int(self._first_row[s])) * self.T
        return self.shards[s][start : start + self.T + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.row + self.global_batch > self.n_rows:  # not a whole global batch left: next epoch
            self.epoch, self.row = self.epoch + 1, 0
        lo = self.row + self.rank * self.B
        mine = self._order_for(self.epoch)[lo : lo + self.B]
        self.row += self.global_batch
        rows = torch.from_numpy(np.stack([self._row(int(j)) for j in mine]).astype(np.int64))  # (B, T+1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # x, y: (B, T)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict) -> None:
        # The position means something only over the same rows in the same order.
        if int(state["seed"]) != self.seed or int(state["n_rows"]) != self.n_rows:
            have = f"seed={self.seed} n_rows={self.n_rows}"
            raise ValueError(f"data position is for seed={state['seed']} n_rows={state['n_rows']}, not {have}")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


# ----------------------------------------------------------------------------- fine-tuning rows in a seeded order


class ExampleSampler:
    """Example indices in a fresh seeded permutation each epoch. The position is plain ints
    (epoch, pos, tokens) so a checkpoint stores it as JSON and resume continues the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch = self.pos = self.tokens = 0
        self._perm_epoch, self._perm = -1, []

    def _order(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            self._perm = list(range(self.n))
            random.Random(f"{self.seed}/{self.epoch}").shuffle(self._perm)  # str seed: stable across runs
            self._perm_epoch = self.epoch
        return self._perm

    def take(self, k: int) -> list[int]:
        """The next k indices, continuing into the next epoch's permutation at the end of this one."""
        out = []
        while len(out) < k:
            chunk = self._order()[self.pos : self.pos + k - len(out)]
            out += chunk
            self.pos += len(chunk)
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "tokens": self.tokens, "n": self.n}

    def load_state_dict(self, d: dict) -> None:
        if d.get("n", self.n) != self.n:
            raise UserError(f"resume: the checkpoint was trained on {d['n']} examples, this data has {self.n}")
        self.epoch, self.pos, self.tokens = d["epoch"], d["pos"], d.get("tokens", 0)
