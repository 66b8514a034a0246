"""train_grpo.py: the loss against a hand-written loop over the paper's equation (three aggregations), the
group advantages, the k3 estimator, where the clip acts, the first update against the REINFORCE-with-baseline
gradient, the reward, a short run that learns a task, and exact resume.

Runs use the micro model (tests/fixtures/model_micro.yaml) and the tokenizer of the `tiny_data_dir` fixture. The
learnable task: every prompt's answer is the digit 7; the starting model is SFT'd to answer a random digit, so
about one completion in ten earns the reward at first and GRPO has a signal to follow.
"""

import json
import math
import os
import random

import pytest
import torch
from conftest import MICRO_MODEL
from safetensors.torch import load_file

import train_grpo
import train_sft
from config import ConfigError, load_yaml, parse_args
from model import ModelConfig, Transformer
from train_grpo import group_advantages, grpo_loss, k3_kl, pick_groups, task_reward, token_logps

# ----------------------------------------------------------------------------- the loss


def reference_loss(logps, old, ref, adv, mask, beta, eps, agg, max_len):
    """The GRPO objective written as the paper's sums, one token at a time (float64 Python numbers)."""
    B, T = mask.shape
    per_seq, n_tok = [], 0
    for i in range(B):
        terms = []
        for t in range(T):
            if not mask[i, t]:
                continue
            rho = math.exp(float(logps[i, t] - old[i, t]))
            a = float(adv[i])
            clipped_rho = min(max(rho, 1 - eps), 1 + eps) if eps > 0 else rho
            objective = min(rho * a, clipped_rho * a)
            d = float(ref[i, t] - logps[i, t])
            kl = math.exp(d) - d - 1
            terms.append(-(objective - beta * kl))
        per_seq.append(terms)
        n_tok += len(terms)
    if agg == "sequence":  # 1/G sum_i 1/|o_i| sum_t
        return sum(sum(s) / len(s) for s in per_seq) / B
    if agg == "token":  # 1/sum_i |o_i| sum_i sum_t
        return sum(sum(s) for s in per_seq) / n_tok
    return sum(sum(s) for s in per_seq) / (B * max_len)  # dr_grpo: 1/(G L) sum_i sum_t


def fixed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios in ~[0.67, 1.5]
    ref = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 3, 5, 2, 6])
    mask = torch.arange(T)[None] < lengths[:, None]  # ragged completions
    mask[2, 0] = False  # a completion that starts one token later (a longer prompt)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("agg", ["token", "sequence", "dr_grpo"])
def test_loss_equals_the_equation_written_as_loops(agg):
    logps, old, ref, adv, mask = fixed_batch()
    for beta, eps in [(0.0, 0.2), (0.1, 0.2), (0.04, 0.0)]:
        got, _ = grpo_loss(logps, old, ref, adv, mask, beta=beta, clip_eps=eps, loss_agg=agg, max_len=9)
        want = reference_loss(logps, old, ref, adv, mask, beta, eps, agg, max_len=9)
        assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    # Split into two micro-batches with the whole batch's normalizers: the parts add up to the whole.
    kw = dict(beta=0.1, clip_eps=0.2, loss_agg=agg, max_len=9, n_seqs=6.0, n_tokens=float(mask.sum()))
    whole, _ = grpo_loss(logps, old, ref, adv, mask, **kw)
    parts = sum(grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], **kw)[0] for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


def test_advantages_and_groups_without_signal():
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0.1, 0.1, 0.1, 0.1, 0.1, 1, 0.1, 0])
    adv = group_advantages(rewards, 4, scale=True)
    assert torch.equal(adv[:8], torch.zeros(8)) and torch.equal(adv[12:16], torch.zeros(4))  # all-equal: exactly 0
    r = [1.0, 0, 0, 0]
    mean = sum(r) / 4
    std = (sum((v - mean) ** 2 for v in r) / 3) ** 0.5  # unbiased, as TRL
    torch.testing.assert_close(adv[8:12], torch.tensor([(v - mean) / (std + 1e-4) for v in r]), rtol=1e-6, atol=1e-6)
    unscaled = group_advantages(rewards, 4, scale=False)
    torch.testing.assert_close(unscaled[16:], torch.tensor([0.1, 1, 0.1, 0]) - 0.3, rtol=1e-6, atol=1e-6)
    assert torch.equal(unscaled[:8], torch.zeros(8))


def test_dynamic_sampling_keeps_the_groups_with_a_signal_first():
    # six groups of 3, in draw order: all 0 | mixed | all 1 | mixed | all 0.5 | mixed (0.5 vs 0)
    rewards = torch.tensor([0.0, 0, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0.5, 0.5, 0.5, 0.5, 0, 0.5])
    assert pick_groups(rewards, 3, 3) == [1, 3, 5]  # exactly the mixed ones
    assert pick_groups(rewards, 3, 2) == [1, 3]  # too many mixed: the first drawn
    assert pick_groups(rewards, 3, 4) == [0, 1, 3, 5]  # too few: filled with the first of the rest, in draw order
    assert pick_groups(rewards, 3, 6) == list(range(6))
    # the groups it calls mixed are exactly those whose advantages are not all zero
    adv = group_advantages(rewards, 3).view(-1, 3)
    assert [g for g in range(6) if adv[g].abs().sum() > 0] == [1, 3, 5]


def test_k3_is_nonnegative_zero_at_equal_policies_and_estimates_the_kl():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10_000, generator=g) * 3, torch.randn(10_000, generator=g) * 3
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(10_000))
    # Tokens drawn from p: the mean of k3 is KL(p || q).
    p = torch.softmax(torch.randn(20, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(20, generator=g, dtype=torch.float64), 0)
    draws = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = k3_kl(p.log()[draws], q.log()[draws]).mean()
    exact = (p * (p.log() - q.log())).sum()
    assert estimate.item() == pytest.approx(exact.item(), rel=0.03)  # ~200k samples: ~1% standard error


def test_clip_acts_only_outside_the_range_on_the_side_of_the_advantage():
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 1.6], dtype=torch.float64)
    for a in (1.0, -1.0):
        logps = ratios.log().clone().requires_grad_()  # old log-probs 0: rho = exp(logps)
        adv = torch.full((7,), a, dtype=torch.float64)
        loss, stats = grpo_loss(logps[:, None], torch.zeros(7, 1, dtype=torch.float64), None, adv,
                                torch.ones(7, 1, dtype=torch.bool), clip_eps=0.2, loss_agg="sequence")  # fmt: skip
        loss.backward()
        clipped = ratios > 1.2 if a > 0 else ratios < 0.8  # a good answer may not rise, a bad one not fall, too far
        assert torch.equal(logps.grad == 0, clipped)
        torch.testing.assert_close(logps.grad[~clipped], -a * ratios[~clipped] / 7)  # d(-rho A)/d logp / B
        assert stats["clip_frac"].item() == pytest.approx(clipped.double().mean().item())


def micro_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**load_yaml(MICRO_MODEL)))
    model.init_weights()
    return model


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_first_update_is_reinforce_with_the_group_baseline(agg):
    """ratio 1 (old = the policy itself) and beta 0: the gradient is -sum_i A_i grad log pi(o_i) / N, with
    log pi taken from the model's own cross-entropy (an independent path), and so is one SGD step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, 512, (4, 12), generator=g)
    y = torch.randint(4, 512, (4, 12), generator=g)
    y[:, :5] = -1  # the prompt
    y[1, 9:] = -1  # a shorter completion (padding)
    adv = torch.tensor([1.5, -0.5, -1.0, 0.0])
    models = [micro_model(), micro_model()]
    logps, _ = token_logps(models[0], x, y)
    loss, _ = grpo_loss(logps, logps.detach(), None, adv, y != -1, clip_eps=0.2, loss_agg=agg)
    loss.backward()
    nll = models[1](x, y, loss_reduction="none")  # (B, T) -log p, 0 on ignored targets
    n = (y != -1).sum(dim=1).double()
    seq_logp = -nll.sum(dim=1)
    reinforce = -(adv * seq_logp).sum() / n.sum() if agg == "token" else -(adv * seq_logp / n).sum() / 4
    reinforce.backward()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)
    for m in models:
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # At temperature 0.5 the log-probs are those of softmax(logits / 0.5), the distribution rollouts sample from.
    with torch.no_grad():
        hot = torch.log_softmax(models[0](x).double() / 0.5, dim=-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        torch.testing.assert_close(token_logps(models[0], x, y, 0.5)[0].double(), hot * (y != -1), rtol=1e-5, atol=1e-5)


def test_reward_checks_and_never_runs_the_text():
    assert task_reward(" 6 ", "6") == 1.0 and task_reward("'A'", "'A'", 0.1) == 1.0
    assert task_reward("7", "6", 0.1) == 0.1 and task_reward("[1, 2]", "[2, 1]", 0.1) == 0.1
    assert task_reward("'7'", "6", 0.1) == 0.0 and task_reward("7", "6") == 0.0  # wrong type; no format reward
    assert task_reward("__import__('os').getcwd()", "'x'", 0.1) == 0.0  # not a literal: parsed, never run
    assert task_reward("[" * 10_000, "[1]", 0.1) == 0.0  # too deep for the parser: no crash


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def digit_task(tiny_data_dir, tmp_path_factory):
    """(start model dir, task file): a micro model SFT'd to answer a random digit; the task wants 7."""
    root = tmp_path_factory.mktemp("grpo")
    rng = random.Random(0)
    prompts = [f"{w} = ?" for w in ("cat", "dog", "sun", "map", "owl", "fig", "jam", "kid")]
    with open(root / "sft.jsonl", "w") as fh:
        for _ in range(400):
            msgs = [
                {"role": "user", "content": rng.choice(prompts)},
                {"role": "assistant", "content": str(rng.randrange(10))},
            ]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    with open(root / "task.jsonl", "w") as fh:
        fh.writelines(json.dumps({"prompt": p, "answer": "7"}) + "\n" for p in prompts)
    micro_model().save_pretrained(str(root / "base"), tokenizer_dir=tiny_data_dir)
    args = dict(base=root / "base", out_dir=root / "sft", data=root / "sft.jsonl", val_data="", eval_tasks="",
                finetune="full", steps=60, batch_size=16, micro_batch_size=16, seq_len=32, lr=3e-3, min_lr=3e-4,
                warmup_steps=5, eval_every=0, save_every=60, progress=False, device="cpu", seed=0)  # fmt: skip
    train_sft.main(parse_args(train_sft.SFTConfig, [f"{k}={v}" for k, v in args.items()]))
    return str(root / "sft"), str(root / "task.jsonl")


def grpo_args(start, task, out_dir, **kw):
    args = dict(base=start, out_dir=out_dir, data=task, eval_tasks=task, eval_tasks_n=8, group_size=8,
                max_new_tokens=4, eval_max_new_tokens=4, steps=4, batch_size=32, micro_batch_size=16, seq_len=32,
                lr=2e-2, min_lr=2e-3, warmup_steps=1, eval_every=0, log_every=1, save_every=100, progress=False,
                device="cpu", seed=0, lora_r=4, lora_alpha=8)  # fmt: skip
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def run_grpo(argv):
    train_grpo.main(parse_args(train_grpo.GRPOConfig, argv))


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def test_short_run_learns_the_task(digit_task, tmp_path):
    """Full fine-tuning with the KL on (a frozen copy as the reference): the sampled reward rises from ~0.1 and
    greedy answers switch to the rewarded one."""
    out = str(tmp_path / "grpo")
    run_grpo(grpo_args(*digit_task, out, finetune="full", lr=1e-2, warmup_steps=4, steps=16, beta=0.04, eval_every=16))
    rows = log_rows(out)
    train = [r for r in rows if "reward" in r]
    assert len(train) == 16 and train[0]["kl"] == 0.0  # the first step's policy IS the reference
    first, last = sum(r["reward"] for r in train[:3]) / 3, sum(r["reward"] for r in train[-3:]) / 3
    assert first < 0.4 and last > first + 0.3, (first, last)
    assert all(0 <= r["zero_adv_groups"] <= 1 and r["completion_len"] >= 1 and r["entropy"] > 0 for r in train)
    acc = [r["task_acc"] for r in rows if "task_acc" in r]
    assert acc[-1] > acc[0]
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("oversample", [1, 2])
def test_resume_equals_uninterrupted(digit_task, tmp_path, oversample):
    """Two updates per batch of rollouts (the clip and the stored old log-probs at work) and the KL on: 4 steps
    straight == 2 steps, stop, resume to 4: the same logged numbers and bit-identical adapters."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    kw = dict(updates_per_batch=2, beta=0.1, eval_tasks="", lora_dropout=0.1, oversample=oversample)
    run_grpo(grpo_args(*digit_task, straight, **kw))
    run_grpo(grpo_args(*digit_task, split, stop_after_steps=2, **kw))
    assert not os.path.exists(os.path.join(split, "adapter_model.safetensors"))
    run_grpo(grpo_args(*digit_task, split, **kw))
    keys = ["step", "loss", "kl", "clip_frac", "reward", "entropy", "completion_len", "grad_norm"]
    a, b = ([[r[k] for k in keys] for r in log_rows(d)] for d in (straight, split))
    assert a == b and len(a) == 4 and a[1][3] >= 0  # second update of a batch: ratios move, the clip may act
    x, y = load_file(f"{straight}/adapter_model.safetensors"), load_file(f"{split}/adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_oversampling_trains_on_fewer_groups_without_a_signal(digit_task, tmp_path, monkeypatch):
    """oversample=2 draws all 8 prompts a step and trains on the 4 whose groups carry the most signal: the trained
    batch's share of all-equal groups is at most the sampled one's, and below it whenever the draw allowed. Every
    trained completion still sits next to the prompt it was sampled for."""
    sampled_for, picks = {}, []
    real_rollout, real_make_batch, real_pick = train_grpo.rollout, train_grpo.make_batch, train_grpo.pick_groups

    def rollout(model, prompts, group_size, *args):  # remember which prompt each completion (a list) answers
        outs = real_rollout(model, prompts, group_size, *args)
        sampled_for.update((id(c), tuple(prompts[k // group_size])) for k, c in enumerate(outs))
        return outs

    def make_batch(prompts, completions, pad_id):
        assert all(sampled_for[id(c)] == tuple(p) for p, c in zip(prompts, completions, strict=True))
        return real_make_batch(prompts, completions, pad_id)

    def pick_groups(rewards, group_size, n_keep):
        picks.append(real_pick(rewards, group_size, n_keep))
        return picks[-1]

    for name, fn in (("rollout", rollout), ("make_batch", make_batch), ("pick_groups", pick_groups)):
        monkeypatch.setattr(train_grpo, name, fn)
    out = str(tmp_path / "os")
    run_grpo(grpo_args(*digit_task, out, oversample=2, eval_tasks="", steps=6))
    train = [r for r in log_rows(out) if "reward" in r]
    assert len(train) == 6
    for r in train:  # per step: 8 groups sampled, 4 kept; n_zero_kept = max(0, n_zero_sampled - 4)
        n_zero = round(r["zero_adv_sampled"] * 8)
        assert r["zero_adv_groups"] == max(0, n_zero - 4) / 4, r
    assert any(0 < r["zero_adv_sampled"] for r in train)  # the check above was not only about all-mixed draws
    assert len(picks) == 6 and any(p != [0, 1, 2, 3] for p in picks)  # the alignment check saw groups reordered


def test_bad_settings_are_one_line_errors(digit_task):
    with pytest.raises(ConfigError, match="multiple of group_size"):
        parse_args(train_grpo.GRPOConfig, grpo_args(*digit_task, "o", batch_size=30))
    with pytest.raises(ConfigError, match="oversample"):
        parse_args(train_grpo.GRPOConfig, grpo_args(*digit_task, "o", oversample=0))
    with pytest.raises(ConfigError, match="loss_agg"):
        parse_args(train_grpo.GRPOConfig, grpo_args(*digit_task, "o", loss_agg="mean"))
    with pytest.raises(ConfigError, match="multiples of updates_per_batch"):
        parse_args(train_grpo.GRPOConfig, grpo_args(*digit_task, "o", updates_per_batch=3))
