"""eval.py: bits-per-byte by hand, multiple-choice scoring on a hand-built bigram model, exact match, the CLI.

References: hand-computed log-probabilities of a bigram table, a plain loop of mean losses converted to bits
per byte with the byte count, greedy outputs turned into answers. The CLI runs in-process (run_cli + capsys).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_eval.py
"""

import itertools
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MICRO_MODEL

import eval as ev
import finetune
import generation
import tasks
from config import UserError, run_cli
from model import ModelConfig, Transformer
from shards import read_shard


@pytest.fixture(scope="module")
def ckpt(tiny_data_dir, tmp_path_factory):
    import yaml

    torch.manual_seed(0)
    with open(MICRO_MODEL) as f:
        model = Transformer(ModelConfig(**yaml.safe_load(f)))
    path = str(tmp_path_factory.mktemp("ckpt") / "micro")
    model.save_pretrained(path, tokenizer_dir=tiny_data_dir)
    return path


def run_eval(argv, capsys):
    run_cli(ev.main, ev.EvalConfig, argv=argv, show_config=False)
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- language-model metrics


def test_bits_per_byte_on_text_equals_loss_converted_by_hand(ckpt, tmp_path):
    text = "The old man paints a quiet river near the station. Ünïcode costs more bytes than characters.\n"
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    model, tok = generation.load_for_inference(ckpt, device="cpu")
    ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
    with torch.no_grad():
        loss = float(model(ids[:, :-1], targets=ids[:, 1:]))  # mean nats over every text token
    n_pred, n_bytes = ids.shape[1] - 1, len(text.encode("utf-8"))
    got = ev.text_loss(model, tok, str(path), seq_len=128)
    assert got["val_tokens"] == n_pred and got["val_bytes"] == n_bytes
    assert got["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert got["val_bpb"] == pytest.approx(loss * n_pred / math.log(2) / n_bytes, rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    # windows shorter than the document: the same tokens predicted, each with less context
    short = ev.text_loss(model, tok, str(path), seq_len=8)
    assert short["val_tokens"] == n_pred and short["val_bytes"] == n_bytes


def test_shard_loss_equals_plain_window_loop(ckpt, tiny_data_dir):
    model, tok = generation.load_for_inference(ckpt, device="cpu")
    tokens = np.concatenate([read_shard(os.path.join(tiny_data_dir, f)) for f in sorted(os.listdir(tiny_data_dir))
                             if f.startswith("val_")]).astype(np.int64)  # fmt: skip
    T, nats, count = 32, 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, T):
            w = torch.from_numpy(tokens[s : s + T + 1])[None]
            nats += float(model(w[:, :-1], targets=w[:, 1:])) * (w.shape[1] - 1)
            count += w.shape[1] - 1
    meta = json.load(open(os.path.join(tiny_data_dir, "meta.json")))
    bytes_per_token = meta["splits"]["val"]["text_bytes"] / meta["splits"]["val"]["tokens"]
    got = ev.shard_loss(model, tok, tiny_data_dir, seq_len=T, batch_size=5)
    assert got["val_tokens"] == count == len(tokens) - 1
    assert got["val_loss"] == pytest.approx(nats / count, rel=1e-5)
    assert got["val_bpb"] == pytest.approx(nats / math.log(2) / (count * bytes_per_token), rel=1e-5)


def test_shards_of_another_tokenizer_are_refused(ckpt, tiny_data_dir, tmp_path):
    model, tok = generation.load_for_inference(ckpt, device="cpu")
    other = tmp_path / "other"
    other.mkdir()
    meta = json.load(open(os.path.join(tiny_data_dir, "meta.json")))
    meta["tokenizer_sha256"] = "0" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="another tokenizer"):
        ev.shard_loss(model, tok, str(other), seq_len=32)


# ----------------------------------------------------------------------------- multiple choice


class CharTokenizer:
    """One id per ASCII character; id 0 is BOS."""

    bos_id, vocab_size = 0, 128

    def encode(self, text, bos=False):
        return [0] * bos + [ord(c) for c in text]


class Bigram(torch.nn.Module):
    """logits[t] = log P(next | token t) from a hand-written table: log-likelihoods are known by hand."""

    def __init__(self, probs):
        super().__init__()
        self.logp = torch.nn.Parameter(probs.log())  # (V, V)
        self.config = SimpleNamespace(max_position_embeddings=64, vocab_size=probs.shape[0])

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.logp[idx]  # (B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        return nll.view(idx.shape)


def bigram_table(rows: dict) -> torch.Tensor:
    """{prev char: {next char: prob}} -> (V, V) table; each row's remaining mass spread over the other ids."""
    V = 128
    probs = torch.full((V, V), 1.0 / V, dtype=torch.float64)
    for prev, nexts in rows.items():
        rest = (1.0 - sum(nexts.values())) / (V - len(nexts))
        probs[ord(prev)] = rest
        for c, p in nexts.items():
            probs[ord(prev), ord(c)] = p
    return probs


def test_choice_scoring_where_length_normalization_matters():
    table = bigram_table(
        {":": {"a": 0.5, "x": 0.45}, "a": {"b": 0.9}, "b": {"c": 0.85, "d": 0.09}, ";": {"y": 0.3, "a": 0.6}}
    )
    model, tok = Bigram(table), CharTokenizer()
    rows = [
        {"context": "Q:", "choices": ["abc", "x"], "label": 0},  # the long right answer loses on the raw sum
        {"context": "R;", "choices": ["y", "abd"], "label": 0},  # the short right answer loses once normalised
    ]
    scores = ev.choice_logprobs(model, tok, rows)
    by_hand = [[math.log(0.5) + math.log(0.9) + math.log(0.85), math.log(0.45)],
               [math.log(0.3), math.log(0.6) + math.log(0.9) + math.log(0.09)]]  # fmt: skip
    for row_scores, row_hand in zip(scores, by_hand, strict=True):
        for (logp, _), want in zip(row_scores, row_hand, strict=True):
            assert logp == pytest.approx(want, rel=1e-5)
    assert [[n for _, n in s] for s in scores] == [[3, 1], [1, 3]]
    # row 0: raw -0.96 (abc) < -0.80 (x) -> wrong; per byte -0.32 > -0.80 -> right.
    # row 1: raw -1.20 (y) > -3.02 (abd) -> right; per byte -1.20 < -1.01 -> wrong.
    assert ev.choice_accuracy(model, tok, rows[:1]) == {"acc": 0.0, "acc_norm": 1.0, "acc_token_norm": 1.0, "n": 1}
    assert ev.choice_accuracy(model, tok, rows[1:]) == {"acc": 1.0, "acc_norm": 0.0, "acc_token_norm": 0.0, "n": 1}


def test_choice_boundary_comes_from_the_joint_tokenization(ckpt):
    _, tok = generation.load_for_inference(ckpt, device="cpu")
    ctx, cont = ev.encode_choice(tok, "The cat sees", " the red ball")
    assert ctx + cont == [tok.bos_id] + tok.encode("The cat sees the red ball")


def test_chat_choices_score_the_assistant_answer(ckpt, tiny_data_dir):
    """chat=True: a choice's log-prob is minus the SFT loss of the chat whose assistant turn is that choice
    (render_chat's mask: answer tokens and <|end|>), computed here through finetune.render_example instead."""
    model, tok = generation.load_for_inference(ckpt, device="cpu")
    rows = [{"prompt": "len('abc') = ?", "choices": ["3", "'abc'"], "label": 0, "context": ">>> len('abc')\n"}]
    scores = ev.choice_logprobs(model, tok, rows, chat=True)
    for choice, (logp, n) in zip(rows[0]["choices"], scores[0], strict=True):
        messages = [{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": choice}]
        x, y = finetune.render_example(tok, messages, 64)
        with torch.no_grad():
            want = -float(model(torch.tensor([x]), torch.tensor([y]), loss_reduction="sum"))
        assert logp == pytest.approx(want, rel=1e-5) and n == sum(t != -1 for t in y)


# ----------------------------------------------------------------------------- exact match


def test_task_accuracy_counts_greedy_answers(ckpt):
    model, tok = generation.load_for_inference(ckpt, device="cpu")
    prompts = ["1 + 1 = ?", "len('ab') = ?", "max(3, 4) = ?", "'a'.upper() = ?"]
    rows = []
    for i, p in enumerate(prompts):
        ids, _ = tok.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)
        out = generation.generate(model, [ids], 8, temperature=0.0, stop_ids=generation.stop_ids_of(tok))[0]
        said = tok.decode(out)
        rows.append({"prompt": p, "answer": said if i % 2 == 0 else said + "!", "family": "easy" if i < 2 else "hard"})
    got = tasks.task_accuracy(rows, generation.chat_answers(model, tok, [r["prompt"] for r in rows], 8, batch_size=3))
    assert got == {"accuracy": 0.5, "by_family": {"easy": 0.5, "hard": 0.5}, "n": 4}


def test_pass_at_k_equals_counting_every_draw():
    """The closed form against brute force: of all C(n, k) ways to draw k of n samples (the first c right),
    the share that holds a right one."""
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations(range(n), k))
                share = sum(any(i < c for i in d) for d in draws) / len(draws)
                assert ev.pass_at_k(n, c, k) == pytest.approx(share, abs=1e-12), (n, c, k)
    for n, c, k in ((4, 1, 5), (4, 5, 1), (4, 1, 0)):
        with pytest.raises(ValueError):
            ev.pass_at_k(n, c, k)


def test_sampled_accuracy_by_hand():
    rows = [{"answer": "3"}, {"answer": "'a'"}, {"answer": "1"}]
    samples = [
        ["3", " 3 ", "4", "5"],  # 2 of 4 right (whitespace is stripped); the majority "3" is right
        ["b", "b", "a", "'a'"],  # 1 of 4 right (quotes matter); the majority "b" is wrong
        ["2", "1", "1", "2"],  # a 2-2 tie goes to "2", sampled first: wrong
    ]
    got = ev.sampled_accuracy(rows, samples, ks=(1, 2, 4))
    # pass@2 per row = 1 - C(wrong, 2) / C(4, 2): 1 - 1/6, 1 - 3/6, 1 - 1/6
    want = {"pass@1": (2 / 4 + 1 / 4 + 2 / 4) / 3, "pass@2": (5 / 6 + 3 / 6 + 5 / 6) / 3, "pass@4": 1.0,
            "maj@4": 1 / 3, "n": 3, "samples": 4}  # fmt: skip
    assert got == pytest.approx(want)
    assert ev.majority_answer(["x", " y", "y ", "x"]) == "x"
    with pytest.raises(ValueError):
        ev.sampled_accuracy(rows, [["3"], ["a", "b"], ["1"]])  # unequal sample counts
    with pytest.raises(ValueError):
        ev.sampled_accuracy(rows, samples, ks=(8,))  # more draws than samples


def test_sampled_answers_at_a_tiny_temperature_are_the_greedy_ones(ckpt, tmp_path, capsys):
    """samples= through the CLI: at temperature 1e-4 the softmax puts all its mass on the argmax token unless two
    logits lie within ~1e-3 of each other, so pass@1, pass@N and maj@N all equal the greedy accuracy that
    chat_answers' separate decode gives, 0.5 by construction of the rows."""
    model, tok = generation.load_for_inference(ckpt, device="cpu")
    prompts = ["1 + 1 = ?", "len('ab') = ?", "max(3, 4) = ?", "'a'.upper() = ?"]
    greedy = generation.chat_answers(model, tok, prompts, 8)
    rows = [
        {"prompt": p, "answer": g if i % 2 else g + "!"} for i, (p, g) in enumerate(zip(prompts, greedy, strict=True))
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [f"checkpoint={ckpt}", "data=", "choices=", f"tasks={path}", "max_new_tokens=8", "samples=3",
            "temperature=1e-4"]  # fmt: skip
    got = json.loads(run_eval(argv, capsys).strip().splitlines()[-1])
    assert got["task_acc"] == 0.5
    assert (got["task_pass@1"], got["task_pass@3"], got["task_maj@3"]) == (0.5, 0.5, 0.5)
    # at the default temperature: one seed, the same samples and scores
    hot = [f"checkpoint={ckpt}", "data=", "choices=", f"tasks={path}", "max_new_tokens=8", "samples=3", "seed=5"]
    first, second = (json.loads(run_eval(hot, capsys).strip().splitlines()[-1]) for _ in range(2))
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    # ... and they are samples: the random micro model almost never says its own greedy answer again at T 0.7
    assert first["task_pass@1"] < got["task_pass@1"]


def test_dpo_pairs_score_their_chosen_answer(ckpt, tmp_path, capsys):
    """tasks= on preference pairs: the same accuracy as on {"prompt", "answer"} rows holding the chosen answers."""
    model, tok = generation.load_for_inference(ckpt, device="cpu")
    prompts = ["1 + 1 = ?", "len('ab') = ?", "max(3, 4) = ?"]
    greedy = generation.chat_answers(model, tok, prompts, 8)
    right = [g if i != 1 else g + "!" for i, g in enumerate(greedy)]  # 2 of 3 match what the model says
    pairs, plain = tmp_path / "pairs.jsonl", tmp_path / "plain.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": c + "?"}) + "\n"
                             for p, c in zip(prompts, right, strict=True)))  # fmt: skip
    plain.write_text(
        "".join(json.dumps({"prompt": p, "answer": c}) + "\n" for p, c in zip(prompts, right, strict=True))
    )
    scores = []
    for path in (pairs, plain):
        argv = [f"checkpoint={ckpt}", "data=", "choices=", f"tasks={path}", "max_new_tokens=8"]
        scores.append(json.loads(run_eval(argv, capsys).strip().splitlines()[-1])["task_acc"])
    assert scores == [pytest.approx(2 / 3), pytest.approx(2 / 3)]


# ----------------------------------------------------------------------------- command line


def plain_shard_loss(model, data_dir, T) -> float:
    """Mean nats per predicted token over the val shards, window by window of T + 1 tokens (stride T)."""
    tokens = np.concatenate([read_shard(os.path.join(data_dir, f)) for f in sorted(os.listdir(data_dir))
                             if f.startswith("val_")]).astype(np.int64)  # fmt: skip
    nats, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, T):
            w = torch.from_numpy(tokens[s : s + T + 1])[None]
            nats += float(model(w[:, :-1], targets=w[:, 1:])) * (w.shape[1] - 1)
            count += w.shape[1] - 1
    return nats / count


def plain_choice_scores(model, tok, row) -> list[tuple[float, float, float]]:
    """Per choice (sum, per UTF-8 byte, per token) of its log-prob by hand: one unpadded forward, log-softmax, the sum
    over the tokens after the context's (the boundary taken from tokenizing context + choice together)."""
    ctx = [tok.bos_id] + tok.encode(row["context"])
    scored = []
    for choice in row["choices"]:
        ids = [tok.bos_id] + tok.encode(row["context"] + choice)
        assert ids[: len(ctx)] == ctx  # the built-in choices never merge across the boundary
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)  # (T, V)
        total = sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))
        scored.append((total, total / len(choice.encode("utf-8")), total / (len(ids) - len(ctx))))
    return scored


def plain_picks(model, tok, row) -> list[int]:
    """The choice each of acc / acc_norm / acc_token_norm picks (ties: the first choice)."""
    scored = plain_choice_scores(model, tok, row)
    return [max(range(len(scored)), key=lambda c, j=j: (scored[c][j], -c)) for j in range(3)]


def test_cli_metrics_equal_plain_computations(ckpt, tiny_data_dir, tmp_path, capsys):
    """Every number the CLI prints against a plain computation: the window loop for the loss, one forward per
    choice for the multiple-choice accuracies, and greedy answers written into the task file (half of them spoiled
    with a "!") for the task accuracy, which must then be exactly 0.5."""
    model, tok = generation.load_for_inference(ckpt, device="cpu")
    rows = tasks.load_jsonl(f"{tiny_data_dir}/test.jsonl", tasks.TEST_KEYS)[:12]
    for i, row in enumerate(rows):
        ids, _ = tok.render_chat([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
        said = tok.decode(
            generation.generate(model, [ids], 6, temperature=0.0, stop_ids=generation.stop_ids_of(tok))[0]
        )
        row["answer"] = said if i % 2 == 0 else said + "!"
    task_file = tmp_path / "tasks.jsonl"
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Multiple choice: 12 rows on which the three scores do not all agree with the label alike (a random model's
    # picks; found by hand-scoring the built-in rows), so that each accuracy is a different number.
    choice_rows, by_kind = [], {}
    for r in tasks.load_jsonl(f"{tiny_data_dir}/choice_test.jsonl", {"context": str, "choices": list}):
        hits = tuple(p == r["label"] for p in plain_picks(model, tok, r))
        by_kind.setdefault(hits, []).append(r)
    quota = {(True, False, False): 3, (True, True, False): 2, (False, True, False): 1, (False, False, True): 1}
    for hits, n in quota.items():  # acc, acc_norm, acc_token_norm: 5, 3 and 1 hits of 12 on the built-in rows
        choice_rows += by_kind.get(hits, [])[:n]
    choice_rows += by_kind.get((False, False, False), [])[: 12 - len(choice_rows)]
    choice_file = tmp_path / "choices.jsonl"
    choice_file.write_text("".join(json.dumps(r) + "\n" for r in choice_rows))
    argv = [f"checkpoint={ckpt}", f"data={tiny_data_dir}", f"tasks={task_file}", f"choices={choice_file}",
            "limit=12", "seq_len=32", "max_new_tokens=6"]  # fmt: skip
    metrics = json.loads(run_eval(argv, capsys).strip().splitlines()[-1])
    assert isinstance(metrics["choice_chat_acc"], float)
    assert metrics["task_n"] == metrics["choice_n"] == 12 and metrics["checkpoint"] == ckpt
    assert metrics["task_acc"] == 0.5
    loss = plain_shard_loss(model, tiny_data_dir, 32)
    assert metrics["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["val_bpb"] == pytest.approx(loss / math.log(2) / val_bytes_per_token(tiny_data_dir), rel=1e-5)
    want = [sum(p[j] == r["label"] for r in choice_rows for p in [plain_picks(model, tok, r)]) / 12 for j in range(3)]
    assert len(set(want)) == 3  # the rows tell the three scores apart, so no key can stand in for another
    for key, value in zip(("acc", "acc_norm", "acc_token_norm"), want, strict=True):
        assert metrics[f"choice_{key}"] == pytest.approx(value), key


def val_bytes_per_token(data_dir) -> float:
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    return meta["splits"]["val"]["text_bytes"] / meta["splits"]["val"]["tokens"]


def test_compare_prints_a_table_then_json(ckpt, tmp_path, capsys):
    second = str(tmp_path / "second")
    torch.manual_seed(1)
    Transformer.from_pretrained(ckpt).save_pretrained(second, tokenizer_dir=ckpt)
    text = tmp_path / "t.txt"
    text.write_text("A dog finds the long road after dinner.\n")
    png, saved = tmp_path / "summary.png", tmp_path / "results" / "eval.json"
    argv = [f"compare={ckpt},{second}", f"data={text}", "tasks=", "choices=", f"plot={png}", f"save={saved}"]
    lines = run_eval(argv, capsys).strip().splitlines()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the summary figure was drawn
    final = json.loads(lines[-1])
    assert json.loads(saved.read_text()) == final  # save= writes the printed object, floats exact
    assert [r["checkpoint"] for r in final["compare"]] == [ckpt, second]
    header = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    assert ckpt in lines[header] and second in lines[header]
    table = {line.split()[0]: line.split()[1:] for line in lines[header + 1 : -1] if not line.startswith("summary")}
    assert set(table) == {"val_loss", "val_ppl", "val_bpb"}
    # Each column is its own checkpoint's loss on the text, computed by hand (one forward of BOS + text).
    for column, path in enumerate([ckpt, second]):
        model, tok = generation.load_for_inference(path, device="cpu")
        ids = torch.tensor([[tok.bos_id] + tok.encode(text.read_text())])
        with torch.no_grad():
            loss = float(model(ids[:, :-1], targets=ids[:, 1:]))
        assert final["compare"][column]["val_loss"] == pytest.approx(loss, rel=1e-5), path
        assert float(table["val_loss"][column]) == pytest.approx(loss, abs=1e-4), path


def test_bad_inputs_exit_2_with_one_line(ckpt, tmp_path, tiny_data_dir, capsys):
    bad_shards = tmp_path / "data"
    bad_shards.mkdir()
    for name in ("meta.json", "val_000.bin"):
        data = open(os.path.join(tiny_data_dir, name), "rb").read()
        (bad_shards / name).write_bytes(data[:-7] if name.endswith(".bin") else data)
    cases = [
        [f"checkpoint={tmp_path / 'nope'}", "tasks=", "choices="],
        [f"checkpoint={ckpt}", f"data={bad_shards}", "tasks=", "choices="],  # truncated shard
        [f"checkpoint={ckpt}", "data=", f"tasks={tiny_data_dir}/sft_train.jsonl", "choices="],  # wrong keys
        [f"checkpoint={ckpt}", "data=", "tasks=", "choices=", f"save={tmp_path / 'eval.txt'}"],  # not .json
        [f"checkpoint={ckpt}", "data=", "choices=", "samples=4", "temperature=0"],  # sampling needs T > 0
        [f"checkpoint={ckpt}", "data=", "tasks=", "choices=", "samples=4"],  # samples of what?
        [
            f"checkpoint={ckpt}",
            "data=",
            "choices=",
            f"tasks={tmp_path / 'noanswer.jsonl'}",
        ],  # neither answer nor chosen
    ]
    (tmp_path / "noanswer.jsonl").write_text('{"prompt": "1 + 1 = ?"}\n')
    for argv in cases:
        with pytest.raises(SystemExit) as e:
            run_cli(ev.main, ev.EvalConfig, argv=argv, show_config=False)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
