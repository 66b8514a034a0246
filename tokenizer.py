"""Tokenizer: train a SentencePiece model, encode/decode text, render chats with an assistant-only loss mask.

What this file does
- `train_tokenizer(files, out_dir, vocab_size, model_type)` trains a SentencePiece BPE or unigram model
  (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"; Kudo 2018,
  "Subword Regularization"; Kudo & Richardson 2018, "SentencePiece") on plain-text files, one sentence per line.
- `Tokenizer(path)` loads it: `encode`, `decode`, `encode_batch`, `render_chat`, `render_prompt_completion`.
- `extend_with_chat_tokens(path, out_dir)` makes a foreign SentencePiece model (Llama / TinyLlama: <unk>, <s>,
  </s>, no pad, no chat markers) usable here: the missing specials are appended as control pieces at the end
  of the vocabulary (existing ids unchanged), so a pretrained model only grows its embedding.
- `python tokenizer.py [CONFIG.yaml] input=a.txt,b.txt out_dir=DIR vocab_size=4096 model_type=bpe`.

Key choices
- byte_fallback: a character outside the vocabulary becomes its UTF-8 bytes (<0x00>..<0xFF>, 256 ids), so no
  input is ever <unk> and every string survives a round trip (the trick Llama 1/2 use).
- split_digits: every digit is its own token, so numbers are spelled the same way wherever they appear
  (Llama, PaLM); arithmetic tasks need that.
- identity normalization, no dummy prefix, whitespace kept as written: the tokenizer never rewrites the text,
  so decode(encode(s)) == s. BPE may learn runs of spaces (code indentation) as single pieces. Unigram may not:
  "▁▁▁▁"+"▁▁" and "▁▁"+"▁▁▁▁" score the same, SentencePiece and transformers break that tie differently,
  and we want the two to give identical ids (unigram costs more tokens on indented code because of it).
- Special tokens: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), <pad>=3, then <|system|>, <|user|>, <|assistant|>, <|end|>.
  They are SentencePiece *control* symbols: one id each, and encode() never produces them from text. A user
  who types "<|user|>" in a message gets ordinary pieces, not a role marker (no prompt injection through
  the template). transformers is different here: it matches special-token strings anywhere in the text.
- Chat format (also written as a Jinja `chat_template` into tokenizer_config.json):
      <s><|system|>SYSTEM<|end|><|user|>QUESTION<|end|><|assistant|>ANSWER<|end|>...
  The loss mask is 1 exactly on the assistant's content tokens and its closing <|end|>: what the model must
  learn to emit. Role markers are special ids, so no piece can merge across a turn boundary.

Text normalisation (documented once, tests check it)
- encode(str): a lone surrogate (not encodable as UTF-8) becomes U+FFFD; encode(bytes): invalid UTF-8 becomes
  U+FFFD (Python's errors="replace"). Everything else round-trips exactly, NUL and control characters included,
  except one SentencePiece quirk: a literal U+2581 "▁" is its space symbol and decodes as " ".
- Training corpus cleaning is stricter and counted, never silent: invalid bytes -> U+FFFD, NUL bytes removed,
  blank lines skipped, lines longer than SentencePiece's max_sentence_length split at whitespace.

Loading with transformers (tests only): tokenizer_config.json names tokenizer_class "TokenizersBackend", the
generic class that converts tokenizer.model by its own model type (BPE or Unigram) with byte fallback and no
pre-tokenizer, which matches our settings; AutoTokenizer.from_pretrained(dir).apply_chat_template(messages)
gives the ids of render_chat(messages).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re

from config import UserError, run_cli

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_ROLES = ("system", "user", "assistant")
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = {"bos": BOS, "eos": EOS, "pad": PAD, **{m[2:-2]: m for m in CHAT_MARKERS}}
MIN_VOCAB = 256 + 4 + len(CHAT_MARKERS) + 64  # byte pieces, <unk>/BOS/EOS/PAD, chat markers, some room
MAX_SENTENCE_BYTES = 4192  # SentencePiece's default max_sentence_length; longer training lines are split

# The same rendering as Tokenizer.render_chat, for transformers' apply_chat_template. No newlines between
# tags on purpose: Jinja would emit them into the prompt. {% generation %} marks what render_chat's mask
# covers, so apply_chat_template(..., return_assistant_tokens_mask=True) reproduces the mask too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# A model with add_dummy_prefix (Llama's) encodes each message as "▁" + content, the way it saw the start of
# every text in pretraining; render_chat keeps that. transformers adds the prefix only at the start of the
# whole string, so the template writes it as a space (" " becomes "▁" there), which gives the same ids.
# (Empty content encodes to no ids at all, so it gets no space either.)
CHAT_TEMPLATE_DUMMY_PREFIX = CHAT_TEMPLATE.replace(
    "message['content'] +", "(' ' if message['content'] else '') + message['content'] +"
)


class CorpusError(UserError, ValueError):
    """Bad user data (missing file, empty corpus). A ValueError for library callers, and a UserError so that
    run_cli prints it as one line without a traceback."""


# ----------------------------------------------------------------------------- corpus cleaning


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """bytes -> (text, number of invalid byte sequences replaced by U+FFFD)."""
    parts, bad, start = [], 0, 0
    while True:
        try:
            parts.append(raw[start:].decode("utf-8"))
            return "".join(parts), bad
        except UnicodeDecodeError as e:  # e.start/e.end: the invalid chunk, relative to raw[start:]
            parts.append(raw[start : start + e.start].decode("utf-8"))
            parts.append("\ufffd")
            bad += 1
            start += e.end


def split_long_line(line: str, max_bytes: int = MAX_SENTENCE_BYTES) -> list[str]:
    """Cut a line into pieces of at most max_bytes UTF-8 bytes, at the last whitespace when there is one."""
    pieces = []
    while len(line.encode("utf-8")) > max_bytes:
        cut = len(line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore"))  # whole characters that fit
        space = max(line.rfind(" ", 0, cut), line.rfind("\t", 0, cut))
        cut = space + 1 if space > 0 else cut  # keep the space with the left piece; no space: hard cut
        pieces.append(line[:cut])
        line = line[cut:]
    return pieces + ([line] if line else [])


def iter_corpus(text_files: list[str], stats: dict, heldout: list[str], heldout_every: int = 0):
    """Yield clean training lines from files, counting everything that was changed into `stats`.

    Every `heldout_every`-th non-blank line (0 = none) goes to the `heldout` list instead of training,
    to measure compression on text the tokenizer did not see.
    """
    for path in text_files:
        with open(path, "rb") as fh:
            for raw in fh:
                stats["lines"] += 1
                stats["bytes"] += len(raw)
                raw = raw.rstrip(b"\n").rstrip(b"\r")
                if b"\0" in raw:
                    stats["nul_bytes"] += raw.count(b"\0")
                    raw = raw.replace(b"\0", b"")
                line, bad = decode_utf8(raw)
                stats["invalid_utf8"] += bad
                if not line.strip():
                    stats["empty_lines"] += 1
                    continue
                if heldout_every and (stats["lines"] % heldout_every == 0):
                    heldout.append(line)
                    continue
                pieces = split_long_line(line)
                if len(pieces) > 1:
                    stats["long_lines_split"] += 1
                stats["train_lines"] += len(pieces)
                yield from pieces


# ----------------------------------------------------------------------------- training


def train_tokenizer(
    text_files: list[str],
    out_dir: str,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    heldout_every: int = 50,
    max_sentences: int = 2_000_000,
    num_threads: int = 1,
    seed: int = 0,
    verbose: bool = True,
) -> Tokenizer:
    """Train SentencePiece on text files (one sentence per line), save it in out_dir, return it.

    The returned tokenizer has `.report`: corpus cleaning counts and bytes per token on held-out lines.
    Deterministic given the files and arguments. Raises CorpusError (a ValueError) for a missing or empty corpus.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB} (256 byte pieces + 8 specials + room), got {vocab_size}")
    if isinstance(text_files, str):
        text_files = [text_files]
    missing = [f for f in text_files if not os.path.isfile(f)]
    if not text_files or missing:
        raise CorpusError(f"input file not found: {missing[0]}" if missing else "no input files given")

    stats = dict.fromkeys(
        ("lines", "bytes", "empty_lines", "invalid_utf8", "nul_bytes", "long_lines_split", "train_lines"), 0
    )
    heldout: list[str] = []
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # only used when the corpus is sampled (more than max_sentences lines)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_corpus(text_files, stats, heldout, heldout_every),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            character_coverage=0.9995,  # rarer characters fall back to bytes
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=(model_type == "bpe"),  # "▁▁▁▁" (indentation) may become one piece
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            control_symbols=list(CHAT_MARKERS),
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # SentencePiece reports corpus problems (e.g. too small for the vocab) this way
        if stats["train_lines"] == 0:
            raise CorpusError(f"empty corpus: no non-blank lines in {', '.join(text_files)}") from None
        reason = re.sub(r"^.*\]\s*", "", str(e).strip().splitlines()[-1])  # drop "INTERNAL: file.cc(744) [check]"
        raise CorpusError(f"SentencePiece training failed: {reason} (more text, or a smaller vocab_size)") from None
    if stats["train_lines"] == 0:
        raise CorpusError(f"empty corpus: no non-blank lines in {', '.join(text_files)}")

    tok = Tokenizer(model_proto=model.getvalue())
    tok.save(out_dir)
    report = dict(stats, model_type=model_type, vocab_size=tok.vocab_size, heldout_lines=len(heldout))
    if heldout:
        report.update(compression(tok, heldout))
    tok.report = report
    with open(os.path.join(out_dir, "tokenizer_report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    if verbose:
        print("tokenizer: " + " ".join(f"{k}={v}" for k, v in report.items()), flush=True)
    return tok


def compression(tok: Tokenizer, texts: list[str]) -> dict:
    """Bytes of UTF-8 text per token (higher = better compression) over a list of strings."""
    n_bytes = sum(len(Tokenizer.clean(t).encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return {
        "heldout_bytes": n_bytes,
        "heldout_tokens": n_tokens,
        "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
    }


# ----------------------------------------------------------------------------- the tokenizer

_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer:
    """A trained SentencePiece model plus our special tokens and chat format.

    Tokenizer(path): path is a directory holding tokenizer.model or the .model file itself.
    """

    def __init__(self, path: str | None = None, *, model_proto: bytes | None = None):
        if model_proto is None:
            if path is None:
                raise ValueError("Tokenizer needs a path or model_proto")
            file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
            if not os.path.isfile(file):
                raise CorpusError(f"tokenizer not found: {file}")
            with open(file, "rb") as fh:
                model_proto = fh.read()
        self._load(model_proto)
        self.path = path  # the directory or file it was loaded from / last saved to
        self.report: dict = {}

    def _load(self, model_proto: bytes) -> None:
        import sentencepiece as spm

        self.model_proto = model_proto
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError):
            raise ValueError("not a SentencePiece model (tokenizer.model could not be parsed)") from None
        self.vocab_size = self.sp.get_piece_size()
        self.dummy_prefix = _model_field(model_proto, "normalizer_spec").add_dummy_prefix  # ours False, Llama True
        # Ids come from the model, never from a fixed layout: ours puts the specials at 0..7, a Llama model
        # extended by extend_with_chat_tokens has <s>=1, </s>=2 and the rest at the end of its vocabulary.
        # BOS/EOS/PAD are the ids the model declares (trainer_spec) when it declares them, else found by piece.
        declared = {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id()}
        self._special = {}
        for name, piece in SPECIAL_TOKENS.items():
            i = declared.get(name, -1)
            if i < 0:
                i = self.sp.piece_to_id(piece)
                if self.sp.id_to_piece(i) != piece or not self.sp.is_control(i):
                    raise ValueError(
                        f"tokenizer.model lacks the control token {piece} "
                        "(tokenizer.extend_with_chat_tokens adds the chat markers to a foreign tokenizer)"
                    )
            self._special[name] = i
        self.bos_id, self.eos_id, self.pad_id = self._special["bos"], self._special["eos"], self._special["pad"]
        self._special_ids = {i: self.sp.id_to_piece(i) for i in range(self.vocab_size) if self.sp.is_control(i)}

    # SentencePieceProcessor is a C++ object: pickle the model bytes instead (multiprocessing workers).
    def __getstate__(self):
        return {"model_proto": self.model_proto, "report": self.report}

    def __setstate__(self, state):
        self._load(state["model_proto"])
        self.report = state["report"]

    def special_id(self, name: str) -> int:
        """Id of a special token by name ("bos", "user", ...) or by text ("<|user|>")."""
        for key, piece in SPECIAL_TOKENS.items():
            if name in (key, piece):
                return self._special[key]
        raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS.values())}")

    # ---- encode / decode

    @staticmethod
    def clean(text: str | bytes) -> str:
        """The documented input normalisation: invalid UTF-8 and lone surrogates -> U+FFFD."""
        if isinstance(text, bytes):
            return text.decode("utf-8", "replace")
        return _SURROGATE.sub("\ufffd", text)

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids. Never produces <unk> or a special token from the text itself."""
        try:
            ids = self.sp.encode(text, out_type=int) if isinstance(text, str) else None
        except (UnicodeEncodeError, RuntimeError):  # a lone surrogate cannot cross into C++ as UTF-8
            ids = None  # retry below with it replaced; any other problem raises again there
        if ids is None:
            ids = self.sp.encode(self.clean(text), out_type=int)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(
        self, texts: list[str], num_threads: int = 1, bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        """Encode many strings; SentencePiece runs them on num_threads C++ threads (the GIL is released)."""
        texts = [self.clean(t) for t in texts]
        out = self.sp.encode(texts, out_type=int, num_threads=num_threads)
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in out]

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids -> text. Special tokens are written as their text ("<|user|>"), like transformers' decode,
        unless skip_special. SentencePiece alone would drop them silently."""
        ids = [int(i) for i in ids]
        out, run = [], []
        for i in ids:
            if i < 0 or i >= self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            if i in self._special_ids:
                out.append(self.sp.decode(run))
                run = []
                out.append("" if skip_special else self._special_ids[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    # ---- chat

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Conversation -> (ids, mask), both length T. mask[t] = 1 on assistant content tokens and the
        assistant's closing <|end|>, 0 elsewhere (BOS, role markers, system and user turns).

        With add_generation_prompt the ids end with <|assistant|> (mask 0): the prompt for sampling.
        """
        ids, mask = [self.bos_id], [0]
        end = self._special["end"]
        for n, message in enumerate(messages):
            role, content = _check_message(message, n)
            piece = self.encode(content)
            learn = int(role == "assistant")
            ids += [self._special[role]] + piece + [end]
            mask += [0] + [learn] * (len(piece) + 1)
        if add_generation_prompt:
            ids.append(self._special["assistant"])
            mask.append(0)
        return ids, mask

    def render_prompt_completion(self, prompt_messages, completion: str) -> tuple[list[int], list[int]]:
        """DPO/SFT pair -> (prompt_ids, completion_ids). The prompt is the chat up to and including the
        generation marker <|assistant|>; the completion is the answer's tokens + <|end|>. Their concatenation
        equals render_chat(prompt + [assistant answer]) exactly: no piece merges across the boundary and
        BOS appears once. prompt_messages may be a plain string (one user turn)."""
        if isinstance(prompt_messages, str):
            prompt_messages = [{"role": "user", "content": prompt_messages}]
        if not isinstance(completion, str):
            raise ValueError(f"completion must be a string, got {type(completion).__name__}")
        prompt_ids, _ = self.render_chat(prompt_messages, add_generation_prompt=True)
        return prompt_ids, self.encode(completion) + [self._special["end"]]

    # ---- files

    def save(self, out_dir: str) -> None:
        """Write tokenizer.model, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
        os.makedirs(out_dir, exist_ok=True)
        self.path = out_dir
        _write(os.path.join(out_dir, "tokenizer.model"), self.model_proto)
        # The model's own pieces (a foreign model may name them differently from our constants).
        bos, eos, pad = (self.id_to_piece(i) for i in (self.bos_id, self.eos_id, self.pad_id))
        unk = self.id_to_piece(self.sp.unk_id())
        config = {
            "tokenizer_class": "TokenizersBackend",  # generic: converts tokenizer.model by its own type (see top)
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "unk_token": unk,
            "add_bos_token": False,  # BOS comes from the chat template / our encode(bos=True), never implicitly
            "add_eos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "extra_special_tokens": list(CHAT_MARKERS),
            "chat_template": CHAT_TEMPLATE_DUMMY_PREFIX if self.dummy_prefix else CHAT_TEMPLATE,
            "model_max_length": 1_000_000_000,
        }
        specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
        specials["additional_special_tokens"] = list(CHAT_MARKERS)
        _write(os.path.join(out_dir, "tokenizer_config.json"), (json.dumps(config, indent=2) + "\n").encode())
        _write(os.path.join(out_dir, "special_tokens_map.json"), (json.dumps(specials, indent=2) + "\n").encode())


def extend_with_chat_tokens(model_path: str, out_dir: str | None = None) -> Tokenizer:
    """A foreign SentencePiece model (e.g. Llama's: <unk>, <s>, </s>, no pad, no chat markers) -> our Tokenizer.

    Each special token of SPECIAL_TOKENS the model lacks (usually <pad> and the four chat markers) is appended
    as a CONTROL piece at the end of the vocabulary, so every existing id keeps its meaning and its embedding
    row; the model's embedding must then grow to the new vocab_size (train_sft.grow_vocab). BOS/EOS the model
    declares are kept. A piece that exists with another type (e.g. "<|user|>" learned as ordinary text) is a
    ValueError: it cannot become a control id without changing how text encodes.
    model_path: a dir holding tokenizer.model, or the file. With out_dir, the result is saved there (save()).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    file = os.path.join(model_path, "tokenizer.model") if os.path.isdir(model_path) else model_path
    if not os.path.isfile(file):
        raise CorpusError(f"tokenizer not found: {file}")
    proto = pb.ModelProto()
    with open(file, "rb") as fh:
        try:
            proto.ParseFromString(fh.read())
        except Exception:  # protobuf's DecodeError; any failure means the same thing here
            raise ValueError(f"{file} is not a SentencePiece model") from None
    kinds = {p.piece: p.type for p in proto.pieces}
    spec = proto.trainer_spec
    declared = {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id}
    for name, piece in SPECIAL_TOKENS.items():
        if 0 <= declared.get(name, -1) < len(proto.pieces):
            continue  # the model's own BOS / EOS / PAD, whatever its piece is called
        if piece in kinds:
            if kinds[piece] != pb.ModelProto.SentencePiece.CONTROL:
                raise ValueError(f"{file}: {piece} exists but is not a control piece; cannot use it as a special token")
            continue
        # Control pieces are never produced by encode(); their score is unused.
        proto.pieces.add(piece=piece, score=0.0, type=pb.ModelProto.SentencePiece.CONTROL)
    tok = Tokenizer(model_proto=proto.SerializeToString())
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def _check_message(message, n: int) -> tuple[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {n} must be a dict with 'role' and 'content'")
    role, content = message["role"], message["content"]
    if role not in CHAT_ROLES:
        raise ValueError(f"message {n}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
    if not isinstance(content, str):
        raise ValueError(f"message {n}: content must be a string, got {type(content).__name__}")
    return role, content


def _model_field(model_proto: bytes, field: str):
    """One field of the SentencePiece ModelProto (trainer_spec, normalizer_spec, ...), parsed by protobuf."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_proto)
    return getattr(proto, field)


def _write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"  # temp file + rename: a crash never leaves half a tokenizer.model
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line


@dataclasses.dataclass
class TokenizerConfig:
    input: list[str] = dataclasses.field(default_factory=list)  # text files to train on, comma-separated
    out_dir: str = "out/tokenizer"  # where tokenizer.model, tokenizer_config.json and the report go
    vocab_size: int = 4096  # total ids, including 256 byte pieces and the 7 special tokens + <unk>
    model_type: str = "bpe"  # bpe | unigram
    heldout_every: int = 50  # every N-th line is held out to measure bytes per token (0 = none)
    max_sentences: int = 2_000_000  # sample at most this many lines for training (seeded)
    num_threads: int = 1  # SentencePiece trainer threads
    seed: int = 0  # seed for sampling lines when the corpus is larger than max_sentences

    def validate(self) -> list[str]:
        errors = []
        if not self.input:
            errors.append("input is required: input=FILE[,FILE...]")
        errors += [f"input file not found: {f}" for f in self.input if not os.path.isfile(f)]
        if self.model_type not in ("bpe", "unigram"):
            errors.append(f"model_type must be bpe or unigram, got {self.model_type!r}")
        if self.vocab_size < MIN_VOCAB:
            errors.append(f"vocab_size must be >= {MIN_VOCAB}, got {self.vocab_size}")
        if self.heldout_every < 0 or self.max_sentences <= 0 or self.num_threads <= 0:
            errors.append("heldout_every must be >= 0, max_sentences and num_threads > 0")
        return errors


def main(cfg: TokenizerConfig) -> Tokenizer:
    tok = train_tokenizer(
        cfg.input,
        cfg.out_dir,
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        heldout_every=cfg.heldout_every,
        max_sentences=cfg.max_sentences,
        num_threads=cfg.num_threads,
        seed=cfg.seed,
    )
    print(f"saved {cfg.out_dir}/tokenizer.model (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")
    return tok


if __name__ == "__main__":
    run_cli(main, TokenizerConfig, __doc__)
