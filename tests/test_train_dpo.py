"""train_dpo.py: the loss variants against hand-computed values and a direct gradient formula, completion
log-probs against a manual sum, the adapters-off reference against the base model, data handling, exact
resume, a short run on the built-in pairs that learns the preferences without hurting task accuracy, and
on-policy pairs (preference_pairs.py): the pair builder on hand-made samples, a judge that never runs model
text, rank-sharded sampling that gathers one list, and an on-policy run that resumes exactly.

Runs use the micro model (tests/fixtures/model_micro.yaml) and the synthetic data prepared once by the
`tiny_data_dir` fixture; the "SFT model" DPO starts from is made here with train_sft.
"""

import ast
import builtins
import json
import math
import os
import random

import pytest
import torch
from conftest import MICRO_MODEL, spawn
from safetensors.torch import load_file

import distributed
import lora
import preference_pairs
import tasks
import train_dpo
import train_sft
from config import UserError, load_yaml, parse_args
from model import ModelConfig, Transformer
from preference_pairs import tokenize_pair
from tokenizer import Tokenizer
from train_dpo import completion_logps, dpo_loss, make_batch, reference_logps

# ----------------------------------------------------------------------------- the loss


def test_loss_is_ln2_when_policy_equals_reference():
    logps = torch.randn(6) * 5
    other = torch.randn(6) * 5
    for loss_type, ls in [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2)]:
        losses, rc, rr = dpo_loss(logps, other, logps, other, beta=0.3, loss_type=loss_type, label_smoothing=ls)
        torch.testing.assert_close(losses, torch.full((6,), math.log(2)), rtol=1e-6, atol=1e-6)
        assert torch.equal(rc, torch.zeros(6)) and torch.equal(rr, torch.zeros(6))


def test_known_values_for_beta_0_1_and_h_2():
    # h = (pc - rc) - (pr - rr) = (1.5 - 0.5) - (-2 - (-1)) = 2
    pc, pr, rc, rr = torch.tensor([1.5]), torch.tensor([-2.0]), torch.tensor([0.5]), torch.tensor([-1.0])

    def loss(loss_type, ls=0.0):
        return dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=ls)[0].item()

    assert loss("sigmoid") == pytest.approx(0.598139, abs=1e-6)  # log(1 + exp(-0.2))
    assert loss("sigmoid", 0.1) == pytest.approx(0.618139, abs=1e-6)  # 0.9 * 0.598139 + 0.1 * 0.798139
    assert loss("hinge") == pytest.approx(0.8, abs=1e-6)  # relu(1 - 0.2)
    assert loss("robust", 0.1) == pytest.approx(0.573139, abs=1e-6)  # (0.9 * 0.598139 - 0.1 * 0.798139) / 0.8
    assert loss("ipo") == pytest.approx((2 - 1 / (2 * 0.1)) ** 2, abs=1e-5)  # (h - 1/(2 beta))^2 = 9
    _, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)  # beta * log-ratio


def test_gradients_match_the_direct_formula():
    """d loss / d policy_chosen = dL/dh, d loss / d policy_rejected = -dL/dh, with dL/dh written out by hand."""
    torch.manual_seed(0)
    beta, eps = 0.5, 0.15
    ref_c, ref_r = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    base_c, base_r = torch.randn(16, dtype=torch.float64) * 3, torch.randn(16, dtype=torch.float64) * 3
    h = (base_c - ref_c) - (base_r - ref_r)
    s = torch.sigmoid
    direct = {  # dL/dh
        ("sigmoid", 0.0): -beta * s(-beta * h),
        ("sigmoid", eps): -(1 - eps) * beta * s(-beta * h) + eps * beta * s(beta * h),
        ("robust", eps): (-(1 - eps) * beta * s(-beta * h) - eps * beta * s(beta * h)) / (1 - 2 * eps),
        ("hinge", 0.0): -beta * (beta * h < 1).double(),
        ("ipo", 0.0): 2 * (h - 1 / (2 * beta)),
    }
    for (loss_type, ls), dl_dh in direct.items():
        pc, pr = base_c.clone().requires_grad_(), base_r.clone().requires_grad_()
        losses, _, _ = dpo_loss(pc, pr, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=ls)
        losses.sum().backward()
        torch.testing.assert_close(pc.grad, dl_dh, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pr.grad, -dl_dh, rtol=1e-10, atol=1e-12)


def test_bad_loss_arguments_are_value_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)


# ----------------------------------------------------------------------------- log-probs and the reference


def micro_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**load_yaml(MICRO_MODEL)))
    model.init_weights()
    return model


PAIRS = [
    ("len('abc') = ?", "3", "4"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sorted([3, 1])[0] = ?"}], "1", "31"),
    ("'e' in 'seal' = ?", "True", "False"),
]


def test_completion_logps_equal_a_manual_sum(tiny_data_dir):
    tok = Tokenizer(tiny_data_dir)
    model = micro_model().eval()
    pairs = [tokenize_pair(tok, p, c, r, seq_len=64) for p, c, r in PAIRS]
    for (prompt, chosen, _), (p, c, _) in zip(PAIRS, pairs, strict=True):  # the boundary is render_chat's, exactly
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        assert p + c == tok.render_chat(messages + [{"role": "assistant", "content": chosen}])[0]
        assert p.count(tok.bos_id) == 1 and c[-1] == tok.special_id("<|end|>")
    padded, packed = make_batch(pairs, tok.pad_id), make_batch(pairs, tok.pad_id, pack_len=64)
    assert padded[0].shape[0] == 2 * len(pairs) and padded[2] is None
    assert packed[0].shape[0] < 2 * len(pairs)  # several sequences share a row
    with torch.no_grad():
        for batch in (padded, packed):  # right-padded rows, one forward; packed rows, one forward
            got = completion_logps(model, batch)  # (2B,)
            for i, (p, c, r) in enumerate(pairs):
                for row, completion in ((i, c), (len(pairs) + i, r)):
                    seq = torch.tensor([p + completion])  # this sequence alone, no padding
                    logp = torch.log_softmax(model(seq)[0].double(), dim=-1)  # (T, V)
                    manual = sum(logp[len(p) - 1 + j, t] for j, t in enumerate(completion))
                    torch.testing.assert_close(got[row].double(), manual, rtol=1e-5, atol=1e-5)


def test_adapters_off_reference_equals_the_base_model_exactly(tiny_data_dir):
    tok = Tokenizer(tiny_data_dir)
    base = micro_model()
    policy = lora.apply_lora(micro_model(), r=4, alpha=8)
    with torch.no_grad():
        for m in lora.lora_layers(policy).values():
            m.lora_B.weight.normal_()  # a trained adapter: the policy now differs from the base
    batch = make_batch([tokenize_pair(tok, p, c, r, 64) for p, c, r in PAIRS], tok.pad_id)
    x = batch[0]
    with torch.no_grad():
        assert not torch.equal(policy(x), base(x))
        with lora.disable_adapters(policy):
            assert torch.equal(policy(x), base(x))  # bit-identical logits
        assert torch.equal(reference_logps(policy, None, batch), completion_logps(base.eval(), batch))
    assert all(not m.disabled for m in lora.lora_layers(policy).values())  # adapters back on after the block


def test_truncation_keeps_the_completion(tiny_data_dir):
    tok = Tokenizer(tiny_data_dir)
    prompt = "the cat sees the red ball every morning " * 20 + "len('abc') = ?"
    p_full, c_full = tok.render_prompt_completion(prompt, "3")
    p, c, r = tokenize_pair(tok, prompt, "3", "4", seq_len=32)
    assert c == c_full and len(p) + max(len(c), len(r)) == 33  # seq_len inputs + 1
    assert p[0] == tok.bos_id and p[1:] == p_full[len(p_full) - len(p) + 1 :]  # BOS, then the prompt's end


def test_pair_formats_and_one_line_errors(tmp_path):
    conv = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}  # fmt: skip
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, conv]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    user_q = [{"role": "user", "content": "q"}]
    assert preference_pairs.read_pairs(str(path)) == [(user_q, "a", "b"), (user_q, "a", "b")]
    same = {**conv, "rejected": conv["chosen"]}
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n" + json.dumps(same) + "\n")
    with pytest.raises(ValueError, match=rf"^{path} line 4: chosen and rejected are identical$"):
        preference_pairs.read_pairs(str(path))
    split = {**conv, "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="line 1: chosen and rejected conversations differ"):
        preference_pairs.to_pair(split, "x line 1")


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def sft_dir(tiny_data_dir, tmp_path_factory):
    """A micro model after a short full SFT on the built-in tasks: the starting point and reference for DPO."""
    root = tmp_path_factory.mktemp("dpo_start")
    micro_model().save_pretrained(str(root / "base"), tokenizer_dir=tiny_data_dir)
    args = dict(
        base=root / "base", out_dir=root / "sft", data=f"{tiny_data_dir}/sft_train.jsonl", val_data="",
        eval_tasks="", finetune="full", steps=500, batch_size=16, micro_batch_size=16, seq_len=64, lr=3e-3,
        min_lr=3e-4, warmup_steps=5, eval_every=0, save_every=500, progress=False, device="cpu", seed=0,
    )  # fmt: skip
    train_sft.main(parse_args(train_sft.SFTConfig, [f"{k}={v}" for k, v in args.items()]))
    return str(root / "sft")


def dpo_args(data_dir, base, out_dir, **kw):
    args = dict(
        base=base, out_dir=out_dir, data=f"{data_dir}/dpo_train.jsonl", eval_tasks=f"{data_dir}/test.jsonl",
        eval_tasks_n=100, steps=6, batch_size=16, micro_batch_size=8, seq_len=64, lr=3e-3, min_lr=1e-4,
        warmup_steps=2, eval_every=0, log_every=1, save_every=100, progress=False, device="cpu", seed=0,
    )  # fmt: skip
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def run_dpo(argv):
    train_dpo.main(parse_args(train_dpo.DPOConfig, argv))


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def test_short_run_learns_the_preferences_and_keeps_task_accuracy(tiny_data_dir, sft_dir, tmp_path):
    """LoRA DPO (adapters-off reference) on 64 built-in pairs seen for 15 epochs: the policy comes to prefer
    the chosen answers (reward accuracy and margin rise from exactly 0: the first step's policy IS the
    reference) while greedy accuracy on the held-out tasks stays near the SFT model's."""
    out = str(tmp_path / "dpo")
    run_dpo(dpo_args(tiny_data_dir, sft_dir, out, steps=30, batch_size=32, micro_batch_size=16, max_examples=64,
                     warmup_steps=3, rpo_alpha=1.0, eval_every=30))  # fmt: skip
    rows = log_rows(out)
    train = [r for r in rows if "rewards/accuracy" in r]
    assert train[0]["rewards/accuracy"] == 0.0 and train[0]["rewards/margin"] == 0.0  # policy == reference
    last = train[-5:]
    assert sum(r["rewards/accuracy"] for r in last) / 5 > 0.75
    assert sum(r["rewards/margin"] for r in last) / 5 > 0.1
    assert all(r["rewards/margin"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"]) for r in train)
    acc = [r["task_acc"] for r in rows if "task_acc" in r]
    assert [r["step"] for r in rows if "task_acc" in r] == [0, 30]
    # Held-out accuracy stays near the SFT model's: 15 epochs on 64 pairs may cost a few of the 100 tasks (0.21 -> 0.16
    # after the built-in tasks were redrawn; one standard error at 0.2 is 0.04). Without the NLL term (rpo_alpha=0) the
    # same run went 0.21 -> 0.08 and fails here.
    assert acc[-1] >= acc[0] - 0.08, acc
    for name in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "merged/model.safetensors"]:
        assert os.path.isfile(os.path.join(out, name)), name
    # The adapter dir loads as base + adapter and equals the merged checkpoint.
    x = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        merged, adapted = Transformer.from_pretrained(f"{out}/merged"), Transformer.from_pretrained(out)
        # fp32: merging rounds W + s B A once, the unmerged path adds the two products: ~1e-5 apart
        torch.testing.assert_close(adapted(x), merged(x), rtol=1e-4, atol=1e-4)


def test_packing_trains_like_padding(tiny_data_dir, sft_dir, tmp_path):
    """pack=true: the same per-sequence log-probs from packed rows, so the same losses and weights as padding
    (fp32, full fine-tuning against a frozen copy, with the RPO term that needs per-sequence lengths)."""
    common = dict(steps=3, finetune="full", rpo_alpha=1.0, eval_tasks="")
    run_dpo(dpo_args(tiny_data_dir, sft_dir, str(tmp_path / "padded"), **common))
    run_dpo(dpo_args(tiny_data_dir, sft_dir, str(tmp_path / "packed"), pack="true", **common))
    a = load_file(str(tmp_path / "padded" / "model.safetensors"))
    b = load_file(str(tmp_path / "packed" / "model.safetensors"))
    # Adam's first steps are about lr * sign(g): summation-order noise in a near-zero gradient can move a weight
    # either way (1 element in 11k moved 4.5e-5 here), so weights get atol 2e-4; the losses below stay at 1e-5.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=2e-4)
    la, lb = ([r for r in log_rows(str(tmp_path / d)) if "loss" in r] for d in ("padded", "packed"))
    assert len(la) == 3 and all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(la, lb, strict=True))
    assert lb[-1]["tokens"] < la[-1]["tokens"]  # fewer tokens computed for the same pairs


def test_replay_weight_zero_trains_like_no_replay(tiny_data_dir, sft_dir, tmp_path):
    """replay_data adds a forward on pretraining rows; at weight 0 the DPO update is unchanged (fp32, the same
    tolerances as packing), at weight 1 it differs and the replay loss is logged."""
    common = dict(steps=3, finetune="full", eval_tasks="")
    runs = {
        "plain": {},
        "zero": dict(replay_data=tiny_data_dir, replay_weight=0.0),
        "one": dict(replay_data=tiny_data_dir),
    }
    for name, extra in runs.items():
        run_dpo(dpo_args(tiny_data_dir, sft_dir, str(tmp_path / name), **common, **extra))
    a, b, c = (load_file(str(tmp_path / name / "model.safetensors")) for name in runs)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=2e-4)
    assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-3
    assert all(r["replay_loss"] > 0 for r in log_rows(str(tmp_path / "one")) if "loss" in r)


def test_exact_resume_and_precomputed_reference(tiny_data_dir, sft_dir, tmp_path):
    """6 steps straight == 3 steps, stop, resume to 6 (bit-identical log and adapter), for the precomputed
    reference; and full fine-tuning with a frozen copy starts from the same first-step loss (ln 2)."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_dpo(dpo_args(tiny_data_dir, sft_dir, straight, ref="precompute", lora_dropout=0.1, max_examples=128))
    run_dpo(dpo_args(tiny_data_dir, sft_dir, split, ref="precompute", lora_dropout=0.1, max_examples=128,
                     stop_after_steps=3))  # fmt: skip
    assert not os.path.exists(os.path.join(split, "adapter_model.safetensors"))
    run_dpo(dpo_args(tiny_data_dir, sft_dir, split, ref="precompute", lora_dropout=0.1, max_examples=128))

    def losses(out):
        return [(r["step"], r["loss"], r["rewards/margin"]) for r in log_rows(out) if "loss" in r]

    assert losses(straight) == losses(split) and len(losses(split)) == 6
    a, b = load_file(f"{straight}/adapter_model.safetensors"), load_file(f"{split}/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = str(tmp_path / "full")
    run_dpo(dpo_args(tiny_data_dir, sft_dir, full, finetune="full", steps=2, lr=1e-4, eval_tasks=""))
    first = [r for r in log_rows(full) if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/accuracy"] == 0.0
    assert os.path.isfile(os.path.join(full, "model.safetensors"))


def test_identical_pair_stops_with_file_and_line(tiny_data_dir, sft_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "a"}\n'
    )
    with pytest.raises(UserError, match=rf"^{path} line 2: chosen and rejected are identical$"):
        run_dpo(dpo_args(tiny_data_dir, sft_dir, str(tmp_path / "o"), data=str(path)))
    with pytest.raises(Exception, match="ref=adapters_off needs finetune=lora"):
        parse_args(train_dpo.DPOConfig, dpo_args(tiny_data_dir, sft_dir, "o", ref="adapters_off", finetune="full"))


# ----------------------------------------------------------------------------- on-policy pairs


def test_pair_builder_on_hand_made_samples():
    """chosen: the policy's own right sample (whitespace and all) when it has one, else the reference answer;
    rejected: its most frequent wrong sample (first seen on a tie); no pair when every sample is right."""
    build = preference_pairs.build_pair
    assert build([" 3", "4", "5", "4"], "3") == (" 3", "4")  # own right answer; "4" twice beats "5" once
    assert build(["4", "5", "5", "[3]"], "3") == ("3", "5")  # nothing right: the reference answer is chosen
    assert build(["'ab'", "ab"], "'ab'") == ("'ab'", "ab")  # quotes matter (tasks.exact_match)
    assert build(["x", "y"], "z") == ("z", "x")  # a tie: the first seen
    assert build(["3", " 3 ", "3"], "3") is None  # all right: nothing to push against
    assert build([], "3") is None


def test_the_judge_never_runs_model_text(tiny_data_dir, monkeypatch, tmp_path):
    """Sampled text that is code stays text: it is compared as a string (so '1 + 2' is not the answer 3) and
    nothing evaluates it, through the whole round (sampling replaced by fixed malicious samples)."""
    marker = tmp_path / "ran"
    evil = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def forbidden(*args, **kwargs):
        raise AssertionError("model text was evaluated")

    for mod, name in ((builtins, "eval"), (builtins, "exec"), (builtins, "compile"), (tasks, "safe_eval"),
                      (ast, "literal_eval")):  # fmt: skip
        monkeypatch.setattr(mod, name, forbidden)
    samples = {0: [evil, "1 + 2", evil, "3"], 1: ["exec('x')", "4", "4", "4"]}  # prompt -> its k samples
    monkeypatch.setattr(preference_pairs, "sample_answers",
                        lambda model, tok, prompts, k, *a: [samples[i] for i in range(len(prompts))])  # fmt: skip
    tok = Tokenizer(tiny_data_dir)
    rows = [([{"role": "user", "content": "1 + 2 = ?"}], "3", "4"), ([{"role": "user", "content": "2 * 2 = ?"}],
            "4", "5")]  # fmt: skip
    pool = preference_pairs.OnPolicyPairs(rows, tok, 64, 0, 4, 0, 0, 8, 1.0)
    stats = pool.refresh(0, None, 0, 1, "cpu")
    assert not marker.exists()
    assert stats["pairs/n"] == 2 and stats["pairs/sample_acc"] == 4 / 8 and stats["pairs/own_chosen"] == 1.0
    want = [preference_pairs.tokenize_pair(tok, rows[0][0], "3", evil, 64),
            preference_pairs.tokenize_pair(tok, rows[1][0], "4", "exec('x')", 64)]  # fmt: skip
    assert pool.pairs == want


def _two_rank_round(info, data_dir, out):
    """Each rank samples its half of a round's prompts with the real model; the gathered pairs are one list."""
    tok = Tokenizer(data_dir)
    rows = preference_pairs.read_pairs(os.path.join(data_dir, "dpo_train.jsonl"))[:12]
    pool = preference_pairs.OnPolicyPairs(rows, tok, 64, 0, 2, 8, 0, 6, 1.0)
    stats = pool.refresh(0, micro_model(), info.rank, info.world_size, "cpu")
    everyone = distributed.all_gather_objects((pool.pairs, stats))
    assert everyone[0] == everyone[1]
    assert stats["pairs/n"] == len(pool.pairs) > 0
    # The draw (8 of 12 prompts) is the same on both ranks and each prompt was judged once: the pairs' prompts
    # are the drawn prompts that got a pair, in prompt order.
    drawn = sorted(random.Random("0/round0").sample(range(12), 8))
    prompts = [tokenize_pair(tok, rows[i][0], "a", "b", 64)[0] for i in drawn]
    assert [p for p, _, _ in pool.pairs] == [p for p in prompts if p in [q for q, _, _ in pool.pairs]]


def test_two_ranks_sample_their_own_prompts_and_share_the_pairs(tiny_data_dir, tmp_path):
    spawn(_two_rank_round, tiny_data_dir, str(tmp_path))


def test_on_policy_run_trains_and_resumes_exactly(tiny_data_dir, sft_dir, tmp_path):
    """pairs=on_policy with a round every 3 steps: 6 steps straight == stop at 3 (a round boundary: the round is
    sampled again from the restored weights), stop at 4 (mid-round: its pairs come from the checkpoint), resume
    to 6; the log and the adapter are bit-identical. Reward accuracy starts at exactly 0 and the first round's margin rises."""
    kw = dict(pairs="on_policy", pair_every=3, pair_prompts=32, samples_per_prompt=4, pair_max_new_tokens=8,
              max_examples=64, rpo_alpha=1.0, eval_tasks="", save_every=100)  # fmt: skip
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_dpo(dpo_args(tiny_data_dir, sft_dir, straight, **kw))
    run_dpo(dpo_args(tiny_data_dir, sft_dir, split, stop_after_steps=3, **kw))
    run_dpo(dpo_args(tiny_data_dir, sft_dir, split, stop_after_steps=1, **kw))
    run_dpo(dpo_args(tiny_data_dir, sft_dir, split, **kw))

    def timeless(out):  # tok_per_s is wall-clock; everything else must match exactly
        return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in log_rows(out)]

    rows = timeless(straight)
    assert rows == timeless(split)
    rounds = [r for r in rows if "pairs/n" in r]
    assert [r["step"] for r in rounds] == [0, 3] and all(r["pairs/n"] > 0 for r in rounds)
    train = [r for r in rows if "rewards/accuracy" in r]
    assert len(train) == 6 and train[0]["rewards/accuracy"] == 0.0  # step 1: the policy is the reference
    # It learns its pairs: after 3 steps on round 0's pairs the margin is positive. (Step 6 is 3 steps into a new
    # round of harder pairs and may sit near 0: -0.005 after the built-in tasks were redrawn.)
    assert train[2]["step"] == 3 and train[2]["rewards/margin"] > 0, train
    a, b = load_file(f"{straight}/adapter_model.safetensors"), load_file(f"{split}/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
