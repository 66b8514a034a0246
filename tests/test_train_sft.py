"""train_sft.py: the assistant-only loss mask, exact padding, the data sampler, full / LoRA / QLoRA runs,
exact resume in a new process, one-line data errors, and that SFT raises held-out task accuracy.

Runs use a randomly initialized micro model (tests/fixtures/model_micro.yaml) saved with save_pretrained
next to the `tiny_data_dir` tokenizer (vocab 512), and the built-in tasks that prepare_data wrote there.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import MICRO_MODEL, ROOT
from safetensors.torch import load_file

import finetune
import lora
import shards
import train_sft
from config import ConfigError, UserError, load_yaml, parse_args
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def micro_base(tiny_data_dir, tmp_path_factory):
    """A random-init micro model + the tiny tokenizer, as a checkpoint dir (the SFT base)."""
    path = str(tmp_path_factory.mktemp("base"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**load_yaml(MICRO_MODEL)))
    model.init_weights()
    model.save_pretrained(path, tokenizer_dir=tiny_data_dir)
    return path


def sft_args(data_dir, base, out_dir, **kw):
    args = dict(
        base=base, out_dir=out_dir, data=f"{data_dir}/sft_train.jsonl", val_data=f"{data_dir}/sft_test.jsonl",
        eval_tasks=f"{data_dir}/test.jsonl", eval_tasks_n=20, families="[easy]", steps=8, batch_size=8,
        micro_batch_size=4, seq_len=96, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=0, log_every=1,
        save_every=100, progress=False, seed=0, device="cpu", eval_at_start=False,
    )  # fmt: skip
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def run_inprocess(argv):
    train_sft.main(parse_args(train_sft.SFTConfig, argv))


def run_subprocess(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "train_sft.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def train_losses(out_dir):
    return {r["step"]: r["loss"] for r in log_rows(out_dir) if "loss" in r}


# ----------------------------------------------------------------------------- data pieces


def test_loss_mask_is_exactly_the_assistant_tokens(tiny_data_dir):
    tok = Tokenizer(tiny_data_dir)
    end = tok.special_id("<|end|>")
    messages = [
        {"role": "system", "content": "Answer like the Python REPL."},
        {"role": "user", "content": "len('abc') = ?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "'ab' * 2 = ?"},
        {"role": "assistant", "content": "'abab'"},
    ]
    x, y = finetune.render_example(tok, messages, seq_len=200)
    # Reference built from plain encode(): each assistant answer's tokens followed by <|end|>, in order.
    expected = tok.encode("3") + [end] + tok.encode("'abab'") + [end]
    assert [t for t in y if t != -1] == expected
    ids, _ = tok.render_chat(messages)
    assert x == ids[:-1] and all(t == -1 or t == ids[i + 1] for i, t in enumerate(y))  # next-token targets
    # The learned span starts right after each <|assistant|> marker and nowhere else.
    starts = [i for i in range(len(y)) if y[i] != -1 and (i == 0 or y[i - 1] == -1)]
    assert [x[i] for i in starts] == [tok.special_id("<|assistant|>")] * 2
    # Truncation keeps the first seq_len positions.
    xs, ys = finetune.render_example(tok, messages, seq_len=10)
    assert xs == x[:10] and ys == y[:10]


def test_padded_batch_gives_each_example_its_own_loss(tiny_data_dir):
    """Right padding is exact: per-example losses in a padded batch equal each example run alone (fp32)."""
    tok = Tokenizer(tiny_data_dir)
    rows = [json.loads(line) for line in open(f"{tiny_data_dir}/sft_train.jsonl")][:5]
    examples = [finetune.render_example(tok, r["messages"], seq_len=96) for r in rows]
    assert len({len(x) for x, _ in examples}) > 1  # different lengths, so padding happens
    x, y = finetune.collate(examples, tok.pad_id)
    for row, (xs, ys) in enumerate(examples):
        assert (x[row, len(xs) :] == tok.pad_id).all() and (y[row, len(ys) :] == -1).all()
        # every learned token of the batch is an assistant token of its own example, across the padding
        assert y[row][y[row] != -1].tolist() == [t for t in ys if t != -1]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**load_yaml(MICRO_MODEL))).eval()
    model.init_weights()
    with torch.no_grad():
        batch = model(x, y, loss_reduction="none")  # (B, T)
        for row, (xs, ys) in enumerate(examples):
            alone = model(torch.tensor([xs]), torch.tensor([ys]), loss_reduction="none")[0]
            torch.testing.assert_close(batch[row, : len(xs)], alone, rtol=1e-5, atol=1e-6)
            assert (batch[row, len(xs) :] == 0).all()


def test_packed_rows_give_each_example_its_own_loss(tiny_data_dir):
    """pack(): every example lands whole in one row of <= seq_len tokens, fewer rows than examples, and the
    block-diagonal forward gives each example the per-token losses it has alone (fp32)."""
    tok = Tokenizer(tiny_data_dir)
    rows = [json.loads(line) for line in open(f"{tiny_data_dir}/sft_train.jsonl")][:12]
    examples = [finetune.render_example(tok, r["messages"], seq_len=96) for r in rows]
    x, y, doc = finetune.pack(examples, tok.pad_id, seq_len=96)
    assert x.shape[0] < len(examples) and x.shape[1] <= 96
    assert int((y != -1).sum()) == sum(sum(t != -1 for t in ys) for _, ys in examples)  # no target lost or added
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**load_yaml(MICRO_MODEL))).eval()
    model.init_weights()
    found = 0
    with torch.no_grad():
        packed = model(x, y, loss_reduction="none", document_ids=doc)  # (R, T)
        for r in range(x.shape[0]):
            for d in doc[r].unique().tolist():
                if d == -1:
                    assert (y[r][doc[r] == -1] == -1).all()  # padding learns nothing
                    continue
                span = (doc[r] == d).nonzero().flatten()
                xs = x[r, span].tolist()
                ys = y[r, span]
                match = [e for e in examples if e[0] == xs]
                assert match and ys.tolist() == match[0][1]  # the example, contiguous and whole
                alone = model(torch.tensor([xs]), ys[None], loss_reduction="none")[0]
                torch.testing.assert_close(packed[r, span], alone, rtol=1e-5, atol=1e-6)
                found += 1
    assert found == len(examples)


def test_sampler_covers_each_epoch_and_resumes_exactly():
    s = shards.ExampleSampler(10, seed=3)
    first = s.take(7) + s.take(7) + s.take(6)  # two epochs, crossing the boundary mid-take
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert first[:10] != first[10:]  # a fresh permutation per epoch
    a = shards.ExampleSampler(10, seed=3)
    a.take(13)
    state = json.loads(json.dumps(a.state_dict()))  # plain ints: JSON round trip
    b = shards.ExampleSampler(10, seed=3)
    b.load_state_dict(state)
    assert a.take(15) == b.take(15) and first[13:] == shards.ExampleSampler(10, 3).take(20)[13:]


def test_data_errors_name_file_and_line(tiny_data_dir, micro_base, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "1 + 1 = ?"}, {"role": "assistant", "content": "2"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + good + "\n{not json\n")
    proc = run_subprocess(sft_args(tiny_data_dir, micro_base, str(tmp_path / "o"), data=str(bad)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and f"{bad} line 3: invalid JSON" in proc.stderr
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match=r"no_answer.jsonl line 2: conversation has no assistant turn"):
        finetune.load_conversations(str(no_answer))
    # Other files go through `datasets` (hub names too): a bad row is named by its index.
    as_json = tmp_path / "rows.json"
    as_json.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match=r"rows.json \[train\] row 1: conversation has no assistant turn"):
        finetune.load_conversations(str(as_json))


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_lora_run_changes_only_adapters_and_merges(tiny_data_dir, micro_base, tmp_path, finetune):
    out = str(tmp_path / finetune)
    run_inprocess(sft_args(tiny_data_dir, micro_base, out, finetune=finetune, steps=6, lora_r=4, lora_alpha=8))
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["base_model_name_or_path"] == os.path.abspath(micro_base) and cfg["r"] == 4
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B left zero: the adapter trained
    base = load_file(os.path.join(micro_base, "model.safetensors"))
    merged = load_file(os.path.join(out, "merged", "model.safetensors"))
    assert merged.keys() == base.keys()
    for name, w in base.items():
        module = name.rsplit(".", 1)[0]
        if module.endswith(LORA_TARGETS):
            a = adapter[f"base_model.model.{module}.lora_A.weight"]
            b = adapter[f"base_model.model.{module}.lora_B.weight"]
            if finetune == "qlora":  # QLoRA trains against (and merges into) the NF4 round trip of the base
                w = lora.nf4_dequantize(lora.nf4_quantize(w), w.shape)
            expected = w + (8 / 4) * (b @ a)  # W + alpha/r * B A, in plain torch
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[name], w), name  # embeddings, norms, MLP: untouched
    # The adapter dir (base + adapter) and the merged dir are the same model.
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        via_adapter = Transformer.from_pretrained(out)(idx)
        via_merged = Transformer.from_pretrained(os.path.join(out, "merged"))(idx)
    if finetune == "lora":
        torch.testing.assert_close(via_adapter, via_merged, rtol=1e-4, atol=1e-5)


def test_rerun_of_the_other_kind_in_the_same_out_dir_leaves_one_model(tiny_data_dir, micro_base, tmp_path):
    """make demo FORCE=1 after the demo recipe moved from LoRA to full fine-tuning: out/sft kept the LoRA run's
    adapter_config.json next to the new model.safetensors, and DPO refused the dir as an adapter (found by running it)."""
    out = str(tmp_path / "sft")
    lora_run = dict(finetune="lora", steps=2, lora_r=4, lora_alpha=8, resume="never", overwrite="true")
    run_inprocess(sft_args(tiny_data_dir, micro_base, out, **lora_run))
    assert os.path.isfile(os.path.join(out, "adapter_config.json")) and os.path.isdir(os.path.join(out, "merged"))
    run_inprocess(sft_args(tiny_data_dir, micro_base, out, finetune="full", steps=2, resume="never", overwrite="true"))
    lora_files = ("adapter_config.json", "adapter_model.safetensors", "merged")
    assert not any(os.path.exists(os.path.join(out, n)) for n in lora_files)
    full = load_file(os.path.join(out, "model.safetensors"))
    loaded = Transformer.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in full.items())  # the dir is the full run's model, nothing else
    # And back: no stale full model beside the adapter.
    run_inprocess(sft_args(tiny_data_dir, micro_base, out, **lora_run))
    assert not any(os.path.exists(os.path.join(out, n)) for n in ("config.json", "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def hand_written_full_finetune(base, examples, lrs, weight_decay, clip):
    """The SFT step in plain PyTorch: for each step's examples, one unpadded example at a time, summed cross-entropy
    on the assistant targets / their count, backward, clip the global norm, AdamW (decay on matrices only).
    Returns (per-step losses, final state dict)."""
    model = Transformer.from_pretrained(base)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lrs[0], betas=(0.9, 0.95), eps=1e-8)  # fmt: skip
    losses = []
    for lr, step_examples in zip(lrs, examples, strict=True):
        total, count = torch.zeros(()), 0
        for x, y in step_examples:
            logits = model(torch.tensor([x]))[0]  # (T, V)
            y = torch.tensor(y)
            keep = y != -1  # assistant tokens only
            total = total + torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum")
            count += int(keep.sum())
        loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model.state_dict()


def test_full_finetune_equals_a_hand_written_loop(tiny_data_dir, micro_base, tmp_path):
    """Two full fine-tuning steps (2 micro-batches each) against hand_written_full_finetune on the same examples
    (the sampler's order, tested above). weight_decay=1 so that decaying the norm gains, or not decaying the
    matrices, moves weights by ~lr * w, far outside the tolerance."""
    out = str(tmp_path / "full")
    run_inprocess(sft_args(tiny_data_dir, micro_base, out, finetune="full", steps=2, weight_decay=1.0, grad_clip=0.5))
    cfg = parse_args(train_sft.SFTConfig, sft_args(tiny_data_dir, micro_base, out, finetune="full", steps=2))
    tok = Tokenizer(tiny_data_dir)
    rows = finetune.load_conversations(cfg.data, families=cfg.families)
    train = [finetune.render_example(tok, r["messages"], cfg.seq_len) for r in rows]
    sampler = shards.ExampleSampler(len(train), cfg.seed)
    examples = [[train[i] for i in sampler.take(cfg.batch_size)] for _ in range(2)]
    lrs = [cfg.lr * 1 / cfg.warmup_steps, cfg.lr * 2 / cfg.warmup_steps]  # linear warmup over 2 steps
    want_losses, want = hand_written_full_finetune(micro_base, examples, lrs, weight_decay=1.0, clip=0.5)

    losses = train_losses(out)
    assert sorted(losses) == [1, 2]
    for step, want_loss in enumerate(want_losses, start=1):
        assert losses[step] == pytest.approx(want_loss, rel=1e-5), step
    final, base = load_file(os.path.join(out, "model.safetensors")), load_file(f"{micro_base}/model.safetensors")
    assert final.keys() == base.keys()
    for name, w in final.items():
        # Adam divides by sqrt(v): summation-order noise in near-zero gradients shows up to ~1e-5 (see below).
        torch.testing.assert_close(w, want[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))


def test_accumulation_equals_one_big_batch(tiny_data_dir, micro_base, tmp_path):
    """4 micro-batches of 2 == one batch of 8: the loss is normalized by the step's assistant tokens,
    not per micro-batch, so answers of different lengths weigh the same either way (fp32)."""
    big, acc = str(tmp_path / "big"), str(tmp_path / "acc")
    run_inprocess(sft_args(tiny_data_dir, micro_base, big, finetune="full", steps=3, micro_batch_size=8))
    run_inprocess(sft_args(tiny_data_dir, micro_base, acc, finetune="full", steps=3, micro_batch_size=2))
    a, b = load_file(os.path.join(big, "model.safetensors")), load_file(os.path.join(acc, "model.safetensors"))
    # Adam divides by sqrt(v), which amplifies summation-order noise in near-zero gradients: atol 1e-5.
    # A per-micro-batch mean would move weights by ~lr = 3e-3.
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
    la, lb = train_losses(big), train_losses(acc)
    assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) < 1e-5 for s in la)


def test_packing_trains_like_padding(tiny_data_dir, micro_base, tmp_path):
    """pack=true computes the same token-weighted loss on the same examples as padding: equal losses and
    weights after 3 full fine-tuning steps, up to summation order (fp32, atol 1e-5 as for accumulation)."""
    padded, packed = str(tmp_path / "padded"), str(tmp_path / "packed")
    # seq_len 128 (the demo's) holds a whole micro-batch of 4 chats in one packed row, so packing computes their summed
    # length instead of 4 x the longest. At seq_len 96 an overflowing row can cost more than padding: first-fit
    # decreasing pads every row to the longest one, and a redraw of the built-in tasks made this check fail there.
    run_inprocess(sft_args(tiny_data_dir, micro_base, padded, finetune="full", steps=3, seq_len=128))
    run_inprocess(sft_args(tiny_data_dir, micro_base, packed, finetune="full", steps=3, seq_len=128, pack="true"))
    a, b = load_file(os.path.join(padded, "model.safetensors")), load_file(os.path.join(packed, "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
    la, lb = train_losses(padded), train_losses(packed)
    assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) < 1e-5 for s in la)
    # and it did pack: fewer tokens processed for the same examples
    tokens = [max(r.get("tokens", 0) for r in log_rows(out)) for out in (packed, padded)]
    assert 0 < tokens[0] < tokens[1], tokens


def test_exact_resume_in_a_new_process(tiny_data_dir, micro_base, tmp_path):
    """8 steps straight == 3 steps, exit, a new process resumes to 8: bit-identical losses and adapter.
    lora_dropout and dropout make the restored RNG state matter; the data position must be exact too."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = dict(finetune="lora", lora_dropout=0.1, dropout=0.1, eval_every=4)
    assert run_subprocess(sft_args(tiny_data_dir, micro_base, straight, **common)).returncode == 0
    first = run_subprocess(sft_args(tiny_data_dir, micro_base, split, stop_after_steps=3, **common))
    assert first.returncode == 0 and "saved step 3" in first.stdout
    assert not os.path.exists(os.path.join(split, "adapter_model.safetensors"))  # not finished: no export yet
    second = run_subprocess(sft_args(tiny_data_dir, micro_base, split, **common))
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr
    assert train_losses(straight) == train_losses(split)  # exact float equality, every step
    a = load_file(os.path.join(straight, "adapter_model.safetensors"))
    b = load_file(os.path.join(split, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = [r for r in log_rows(split) if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]  # log.jsonl reads as one clean run


# ----------------------------------------------------------------------------- replay of pretraining text


def test_replay_rows_are_documents_of_their_own(tiny_data_dir, micro_base):
    """add_replay appends whole pretraining rows to a packed micro-batch: each chat and each replay row gets exactly
    the per-token losses it gets alone (fp32, atol 1e-5), and seek(n) lands where n next_batch() calls do."""
    tok = Tokenizer(tiny_data_dir)
    rows = finetune.load_conversations(f"{tiny_data_dir}/sft_train.jsonl")[:6]
    examples = [finetune.render_example(tok, r["messages"], 64) for r in rows]
    stream = finetune.replay_stream(tiny_data_dir, 2, 64, tok, rank=0, world_size=1, accum=1, seed=0)
    xr, yr = stream.next_batch()  # (2, 64)
    x, y, doc = finetune.pack(examples, tok.pad_id, 64)
    n = len(x)
    x, y, doc = finetune.add_replay(x, y, doc, xr, yr, tok.pad_id)
    T = x.shape[1]
    assert T == 64 and x.shape[0] == n + 2 and torch.equal(x[n:], xr) and torch.equal(y[n:], yr)  # whole rows
    model = Transformer.from_pretrained(micro_base)
    with torch.no_grad():
        nll = model(x, y, loss_reduction="none", document_ids=doc)  # (R, T)
        for j in range(2):  # each replay row alone, no packing
            alone = model(xr[j : j + 1, :T], yr[j : j + 1, :T], loss_reduction="none")[0]
            torch.testing.assert_close(nll[n + j], alone, rtol=1e-5, atol=1e-5)
        sft_alone = sum(
            float(model(torch.tensor([ex[0]]), torch.tensor([ex[1]]), loss_reduction="sum")) for ex in examples
        )
    assert float(nll[:n].sum()) == pytest.approx(sft_alone, abs=1e-4)
    for steps in (0, 1, stream.batches_per_epoch, stream.batches_per_epoch + 3):
        walked = finetune.replay_stream(tiny_data_dir, 2, 64, tok, rank=0, world_size=1, accum=1, seed=0)
        for _ in range(steps):
            walked.next_batch()
        jumped = finetune.replay_stream(tiny_data_dir, 2, 64, tok, rank=0, world_size=1, accum=1, seed=0)
        finetune.seek(jumped, steps)
        assert torch.equal(walked.next_batch()[0], jumped.next_batch()[0]), steps


def test_replay_weight_zero_trains_like_no_replay(tiny_data_dir, micro_base, tmp_path):
    """Replay rows join the batch but, at weight 0, leave the SFT gradient unchanged (fp32, atol 1e-5 as for
    accumulation); at weight 1 the weights move differently and the replay loss is logged."""
    plain, zero, one = (str(tmp_path / n) for n in ("plain", "zero", "one"))
    common = dict(finetune="full", steps=3, pack="true")
    run_inprocess(sft_args(tiny_data_dir, micro_base, plain, **common))
    run_inprocess(sft_args(tiny_data_dir, micro_base, zero, replay_data=tiny_data_dir, replay_weight=0.0, **common))
    run_inprocess(sft_args(tiny_data_dir, micro_base, one, replay_data=tiny_data_dir, **common))
    a, b, c = (load_file(os.path.join(d, "model.safetensors")) for d in (plain, zero, one))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
    assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-4
    assert all(r["replay_loss"] > 0 for r in log_rows(one) if "loss" in r)
    with pytest.raises(ConfigError, match="replay_data: no prepared data dir"):
        run_inprocess(sft_args(tiny_data_dir, micro_base, str(tmp_path / "bad"), replay_data=str(tmp_path)))


# ----------------------------------------------------------------------------- what SFT achieves


def test_sft_raises_heldout_task_accuracy(tiny_data_dir, micro_base, tmp_path):
    """Full SFT of the micro model on the easy built-in tasks: held-out greedy exact match goes from 0
    (a random model never emits `answer<|end|>`) to ~0.37 (measured over seeds 0-3: 0.37-0.38 on 100 rows)."""
    out = str(tmp_path / "learn")
    run_inprocess(
        sft_args(tiny_data_dir, micro_base, out, finetune="full", steps=120, batch_size=32, micro_batch_size=32,
                 warmup_steps=10, eval_tasks_n=100, eval_at_start=True, val_data="", log_every=20)
    )  # fmt: skip
    accs = [r["task_acc"] for r in log_rows(out) if "task_acc" in r]
    before, after = accs[0], accs[-1]
    assert after >= before + 0.2 and after >= 0.25, (before, after)


# ----------------------------------------------------------------------------- an HF Llama base without chat markers


def test_lora_on_hf_llama_with_foreign_tokenizer(tiny_data_dir, tmp_path):
    """The TinyLlama case in miniature: a transformers LlamaForCausalLM dir whose SentencePiece tokenizer has
    only <unk>, <s>, </s>. SFT extends the tokenizer, grows the (untied) embedding and lm_head, trains them
    next to the adapters, and the merged model loads in transformers with our logits; PEFT reads the adapter."""
    import io

    import sentencepiece as spm
    import transformers
    from peft import PeftModel

    rows = [json.loads(line) for line in open(f"{tiny_data_dir}/sft_train.jsonl")]
    lines = [m["content"] for r in rows for m in r["messages"]]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=400, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )  # Llama's trainer settings; default specials <unk>=0, <s>=1, </s>=2 and no pad  # fmt: skip
    base = str(tmp_path / "hf_llama")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(hf_config).save_pretrained(base)
    with open(os.path.join(base, "tokenizer.model"), "wb") as fh:
        fh.write(proto.getvalue())

    out = str(tmp_path / "sft")
    run_inprocess(
        sft_args(tiny_data_dir, base, out, finetune="lora", steps=3, batch_size=4, val_data="", eval_tasks="",
                 lr=1e-2, warmup_steps=0)
    )  # fmt: skip
    tok = Tokenizer(os.path.join(out, "merged"))  # the merged dir carries the extended tokenizer
    assert tok.vocab_size == 405 and [tok.special_id(m) for m in ("pad", "<|user|>", "<|end|>")] == [400, 402, 404]
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    adapter_cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert sorted(adapter_cfg["modules_to_save"]) == ["embed_tokens", "lm_head"]
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    emb = adapter["base_model.model.model.embed_tokens.weight"]  # (405, 32)
    assert emb.shape == (405, 32)
    orig = load_file(os.path.join(base, "model.safetensors"))["model.embed_tokens.weight"]
    init_row = orig.mean(dim=0)  # Hewitt 2021 init of every new row, before training moved the used ones
    assert (emb[402] - init_row).abs().max() > 1e-4  # <|user|> is in every input: its row trained
    assert (emb[:400] - orig).abs().max() > 1e-4  # the embedding trained in full, not only the new rows

    merged = os.path.join(out, "merged")
    idx = torch.tensor([tok.render_chat(rows[0]["messages"])[0]])  # (1, T), markers included
    with torch.no_grad():
        ours = Transformer.from_pretrained(merged)(idx)  # (1, T, 405)
        hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
        torch.testing.assert_close(hf(idx).logits, ours, rtol=1e-4, atol=1e-5)
        via_adapter = Transformer.from_pretrained(out)(idx)  # base grown to 405 rows, then the adapter
        torch.testing.assert_close(via_adapter, ours, rtol=1e-4, atol=1e-5)
        # PEFT's own loader on the same files (it needs the base resized first, as with any added tokens).
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base)
        hf_base.resize_token_embeddings(405)
        peft_model = PeftModel.from_pretrained(hf_base, out).eval()
        torch.testing.assert_close(peft_model(idx).logits, ours, rtol=1e-4, atol=1e-5)
