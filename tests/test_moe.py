"""Tests for moe.py: routing and dispatch against a per-token loop, a dense MLP and transformers' Mixtral.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_moe.py
"""

import importlib.util
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hf_checkpoint import experts_from_hf, experts_to_hf
from moe import MoEFeedForward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(**overrides):
    """The MoE fields of ModelConfig (moe.py only reads attributes, so a namespace is enough)."""
    cfg = dict(
        hidden_size=16,
        intermediate_size=40,  # the dense width; unused while moe_intermediate_size > 0
        n_experts=4,
        top_k=2,
        n_shared_experts=0,
        moe_intermediate_size=12,
        router="softmax",
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
        router_noise=0.0,
        capacity_factor=0.0,
        bias_update_rate=0.001,
        initializer_range=0.2,  # large so the routing is far from uniform
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def swiglu(x, w_gate, w_up, w_down):
    """Dense Llama MLP on (..., C) with nn.Linear-shaped weights."""
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()


def reference_moe(moe, x, capacity=None):
    """Plain per-token loop: route every token on its own, run its k experts, sum the weighted outputs.

    capacity: per-expert slot limit served first-choice-first, then by token order (what moe.py documents).
    """
    B, T, C = x.shape
    xf = x.reshape(-1, C)
    N, E, K = xf.shape[0], moe.n_experts, moe.top_k
    choices = []  # per token: list of (expert, weight)
    for n in range(N):
        logits = moe.gate.weight @ xf[n]  # (E,)
        if moe.router == "softmax":
            p = torch.softmax(logits, 0)
            idx = torch.topk(p, K).indices
            w = p[idx] / p[idx].sum()
        else:
            s = torch.sigmoid(logits)
            idx = torch.topk(s + moe.expert_bias, K).indices
            w = s[idx] / s[idx].sum()
        choices.append(list(zip(idx.tolist(), w, strict=True)))
    used = [0] * E
    keep = [[False] * K for _ in range(N)]
    for k in range(K):  # first choices claim capacity before second choices
        for n in range(N):
            e = choices[n][k][0]
            if capacity is None or used[e] < capacity:
                used[e] += 1
                keep[n][k] = True
    rows = []
    for n in range(N):
        y = torch.zeros(C, dtype=x.dtype)
        for k, (e, w) in enumerate(choices[n]):
            if keep[n][k]:
                y = y + w * swiglu(xf[n], moe.w1[e], moe.w3[e], moe.w2[e])
        if moe.shared_experts is not None:
            s = moe.shared_experts
            y = y + swiglu(xf[n], s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
        rows.append(y)
    return torch.stack(rows).reshape(B, T, C)


def grads_of(module, x, out):
    params = [p for p in module.parameters() if p.requires_grad]
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    return torch.autograd.grad(out, [x, *params], g)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(router="softmax"),
        dict(router="softmax", top_k=1, n_shared_experts=2),
        dict(router="sigmoid_bias", top_k=2),
    ],
)
def test_matches_per_token_loop(overrides):
    torch.manual_seed(0)
    moe = MoEFeedForward(make_config(**overrides))
    if moe.router == "sigmoid_bias":  # a bias changes the choice but not the weights
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(2, 7, 16, requires_grad=True)
    out = moe(x)
    ref = reference_moe(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads_of(moe, x, out), grads_of(moe, x, ref), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_one_expert_top1_is_dense_mlp():
    torch.manual_seed(0)
    moe = MoEFeedForward(make_config(n_experts=1, top_k=1))
    x = torch.randn(3, 5, 16)
    dense = swiglu(x, moe.w1[0], moe.w3[0], moe.w2[0])  # router weight is exactly 1 for a single expert
    torch.testing.assert_close(moe(x), dense, rtol=1e-5, atol=1e-6)


def test_aux_loss_hand_made_routing():
    # E = C = 4, gate = 2*I and one-hot tokens: token n has logit 2 on its expert, 0 elsewhere.
    E = 4
    moe = MoEFeedForward(make_config(hidden_size=E, n_experts=E, top_k=1, aux_loss_coef=0.1, z_loss_coef=0.01))
    with torch.no_grad():
        moe.gate.weight.copy_(2 * torch.eye(E))
    experts = [0, 0, 1, 2]  # expert 3 gets nothing
    x = F.one_hot(torch.tensor(experts), E).float().reshape(1, 4, E)
    moe(x)
    # by hand: f = [2, 1, 1, 0] / 4; P_i = mean over tokens of softmax, p_hit = e^2/(e^2+3), p_miss = 1/(e^2+3)
    hit, miss = math.exp(2) / (math.exp(2) + 3), 1 / (math.exp(2) + 3)
    f = [0.5, 0.25, 0.25, 0.0]
    P = [(2 * hit + 2 * miss) / 4, (hit + 3 * miss) / 4, (hit + 3 * miss) / 4, 4 * miss / 4]
    balance = E * sum(fi * pi for fi, pi in zip(f, P, strict=True))
    z = math.log(math.exp(2) + 3) ** 2  # the same logsumexp for every token
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.1 * balance + 0.01 * z), rtol=1e-6, atol=0)
    torch.testing.assert_close(moe.metrics["load"], torch.tensor(f))
    assert moe.metrics["load_max"].item() == pytest.approx(2.0) and moe.metrics["load_min"].item() == 0.0
    assert moe.metrics["dropped"].item() == 0.0
    assert moe.aux_loss.requires_grad  # the balance term trains the router through P


def test_aux_loss_perfect_balance_is_one():
    E = 4
    moe = MoEFeedForward(make_config(hidden_size=E, n_experts=E, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.0))
    with torch.no_grad():
        moe.gate.weight.copy_(3 * torch.eye(E))
    x = F.one_hot(torch.arange(8) % E, E).float().reshape(2, 4, E)  # every expert gets 2 of 8 tokens
    moe(x)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.5), rtol=1e-6, atol=0)
    torch.testing.assert_close(moe.metrics["load"], torch.full((E,), 0.25))
    # any imbalance costs more: send everything to expert 0 with the same router
    moe(F.one_hot(torch.zeros(8, dtype=torch.long), E).float().reshape(2, 4, E))
    assert moe.aux_loss.item() > 0.5


def test_router_entropy_metric():
    torch.manual_seed(0)
    moe = MoEFeedForward(make_config())
    x = torch.randn(2, 5, 16)
    moe(x)
    p = torch.softmax(x.reshape(-1, 16) @ moe.gate.weight.t(), -1)
    torch.testing.assert_close(moe.metrics["router_entropy"], -(p * p.log()).sum(-1).mean(), rtol=1e-5, atol=1e-6)


def test_bias_balancing_lowers_imbalance():
    torch.manual_seed(0)
    E = 8
    moe = MoEFeedForward(make_config(n_experts=E, top_k=2, router="sigmoid_bias", bias_update_rate=0.02))
    with torch.no_grad():  # skew: a shared input direction that experts 0 and 1 love
        moe.gate.weight[:2] += 0.5
    moe.train()
    x = torch.randn(4, 16, 16) + 1.0
    imbalance = []
    for _ in range(60):
        with torch.no_grad():
            moe(x)
        imbalance.append(moe.metrics["load_max"].item())
        moe.update_bias()
    assert imbalance[0] > 2.5, imbalance[0]  # starts badly skewed (1.0 = balanced, 4.0 = two experts take all)
    assert max(imbalance[-10:]) < 0.6 * imbalance[0], imbalance
    assert moe.load_counts.sum().item() == 0  # consumed by update_bias


def test_capacity_drops_and_counts():
    torch.manual_seed(0)
    E, K = 4, 2
    moe = MoEFeedForward(make_config(n_experts=E, top_k=K, capacity_factor=0.5, n_shared_experts=1))
    with torch.no_grad():
        moe.gate.weight[0] += 0.6  # most tokens want expert 0
    x = torch.randn(2, 8, 16) + 0.5
    x.requires_grad_(True)
    out = moe(x)
    capacity = math.ceil(0.5 * 16 * K / E)  # 4 slots per expert
    ref = reference_moe(moe, x, capacity=capacity)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads_of(moe, x, out), grads_of(moe, x, ref), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    counts = (moe.metrics["load"] * 16 * K).round()
    assert moe.metrics["dropped"].item() == (counts - capacity).clamp(min=0).sum().item() > 0


def test_capacity_first_choices_win():
    # Every token wants expert 0 first, expert 1 second; capacity 2 keeps the first two tokens' first choices.
    E = 4
    moe = MoEFeedForward(make_config(hidden_size=E, n_experts=E, top_k=2, capacity_factor=1.0, z_loss_coef=0.0))
    with torch.no_grad():
        moe.gate.weight.copy_(torch.diag(torch.tensor([3.0, 2.0, 0.0, 0.0])))
    x = torch.ones(1, 4, E)  # N*K/E = 2 slots per expert
    out = moe(x)
    assert moe.metrics["dropped"].item() == 4.0  # 2 of expert 0's 4 slots and 2 of expert 1's 4
    w0 = torch.tensor([3.0, 2.0]).softmax(0)  # renormalised weights of the two choices
    y0 = swiglu(x[0, 0], moe.w1[0], moe.w3[0], moe.w2[0])
    y1 = swiglu(x[0, 0], moe.w1[1], moe.w3[1], moe.w2[1])
    want = torch.stack([w0[0] * y0 + w0[1] * y1] * 2 + [torch.zeros(E)] * 2)
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-6)


def test_router_noise_only_in_training():
    torch.manual_seed(0)
    moe = MoEFeedForward(make_config(router_noise=1.0))
    x = torch.randn(1, 32, 16)
    moe.eval()
    torch.testing.assert_close(moe(x), reference_moe(moe, x), rtol=1e-5, atol=1e-6)
    moe.train()
    assert not torch.allclose(moe(x), moe(x))  # different choices each call


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    cfg = make_config(initializer_range=0.02, n_shared_experts=1)
    moe = MoEFeedForward(cfg)
    x = torch.randn(2, 8, 16)
    ref = moe(x)
    moe_bf16 = MoEFeedForward(cfg).to(torch.bfloat16)
    moe_bf16.load_state_dict(moe.state_dict())
    out = moe_bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # Relative to the output's own scale (~1e-3 here, so an absolute 1e-3 would pass an all-zero output): bf16 keeps
    # ~3 significant digits, measured 0.6% of the output's norm; 2% allowed. Dropping the routed or the shared
    # experts' output moves it by 65% or 81%.
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err


def test_bad_config_raises():
    with pytest.raises(ValueError, match="router"):
        MoEFeedForward(make_config(router="relu"))
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(make_config(top_k=5))


def test_state_dict_layout_and_hf_keys():
    moe = MoEFeedForward(make_config())
    sd = {f"model.layers.3.block_sparse_moe.{k}": v for k, v in moe.state_dict().items()}
    assert set(sd) == {f"model.layers.3.block_sparse_moe.{k}" for k in ("gate.weight", "w1", "w2", "w3")}
    hf = experts_to_hf(sd)
    assert hf["model.layers.3.block_sparse_moe.experts.2.w1.weight"].shape == (12, 16)
    assert hf["model.layers.3.block_sparse_moe.experts.2.w2.weight"].shape == (16, 12)
    assert len(hf) == 1 + 3 * 4
    back = experts_from_hf(hf)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    del hf["model.layers.3.block_sparse_moe.experts.1.w2.weight"]
    with pytest.raises(ValueError, match="expert"):
        experts_from_hf(hf)
    sig = MoEFeedForward(make_config(router="sigmoid_bias"))
    assert "expert_bias" in sig.state_dict()


# ---- transformers' Mixtral (test-only import) ----
transformers = pytest.importorskip("transformers")


def tiny_mixtral_config(**kw):
    cfg = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    cfg.update(kw)
    return transformers.MixtralConfig(**cfg)


def test_block_matches_hf_mixtral_block():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(tiny_mixtral_config()).eval()
    moe = MoEFeedForward(make_config())
    with torch.no_grad():  # v5 keeps experts fused in memory: gate_up_proj (E,2F,C), down_proj (E,C,F)
        hf.gate.weight.copy_(moe.gate.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([moe.w1, moe.w3], dim=1))
        hf.experts.down_proj.copy_(moe.w2)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(moe(x), hf(x), rtol=1e-5, atol=1e-6)
    # the in-memory v5 state_dict converts to ours too
    sd = {f"model.layers.0.mlp.{k}": v for k, v in hf.state_dict().items()}
    ours = experts_from_hf(sd)
    assert torch.equal(ours["model.layers.0.block_sparse_moe.w3"], moe.w3)
    assert torch.equal(ours["model.layers.0.block_sparse_moe.gate.weight"], moe.gate.weight)


def _model_with_moe():
    """model.py's Transformer when it exists and supports MoE, else skip."""
    if importlib.util.find_spec("model") is None:
        pytest.skip("model.py not written yet")
    import model

    if not hasattr(model, "Transformer") or not hasattr(model.ModelConfig(), "n_experts"):
        pytest.skip("model.py has no MoE Transformer yet")
    return model


def _our_tiny_moe_config(model, **overrides):
    cfg = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        n_experts=4,
        top_k=2,
        moe_intermediate_size=12,
        router="softmax",
        initializer_range=0.2,
    )
    return model.ModelConfig(**{**cfg, **overrides})


def test_transformer_parity_with_hf_mixtral(tmp_path):
    model = _model_with_moe()
    if not hasattr(model.Transformer, "save_pretrained"):
        pytest.skip("model.py has no save_pretrained yet")
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    ours = model.Transformer(_our_tiny_moe_config(model))
    if hasattr(ours, "init_weights"):
        ours.init_weights()
    ours.eval()
    idx = torch.randint(0, 64, (2, 11))
    # ours -> HF
    ours.save_pretrained(tmp_path / "ours")
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), rtol=1e-5, atol=1e-5)
    # HF -> ours, from a checkpoint transformers wrote itself
    torch.manual_seed(1)
    hf2 = MixtralForCausalLM(tiny_mixtral_config()).eval()
    hf2.save_pretrained(tmp_path / "hf")
    ours2 = model.Transformer.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours2(idx), hf2(idx).logits, rtol=1e-5, atol=1e-5)


def test_moe_preset_parameter_counts():
    model = _model_with_moe()
    import yaml

    with open(os.path.join(ROOT, "configs", "model", "0.8B-moe.yaml")) as f:
        text = f.read()
    stated = yaml.safe_load(text)
    cfg = model.ModelConfig.from_preset("0.8B-moe")
    with torch.device("meta"):
        net = model.Transformer(cfg)
    total = sum(p.numel() for p in net.parameters())
    expert = sum(p.numel() for n, p in net.named_parameters() if n.endswith(("block_sparse_moe.w1", ".w2", ".w3")))
    active = total - expert + expert * cfg.top_k // cfg.n_experts
    assert abs(total / 0.8e9 - 1) < 0.02, total
    # the numbers written in the YAML comments ("# total parameters: N", "# active parameters: N")
    for name, value in (("total", total), ("active", active)):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"# {name} parameters:"))
        written = int(line.split(":")[1].split()[0].replace(",", "").replace("_", ""))
        assert abs(written / value - 1) < 0.02, (name, written, value)
    assert stated["n_experts"] == cfg.n_experts


@pytest.mark.parametrize("overrides", [dict(router="sigmoid_bias"), dict(n_shared_experts=1, moe_layers=[1])])
def test_transformer_save_load_roundtrip_non_mixtral_variants(tmp_path, overrides):
    """Variants HF Mixtral cannot express still round-trip through our own checkpoint dir, bit-exact."""
    model = _model_with_moe()
    if not hasattr(model.Transformer, "save_pretrained"):
        pytest.skip("model.py has no save_pretrained yet")
    torch.manual_seed(0)
    ours = model.Transformer(_our_tiny_moe_config(model, **overrides)).eval()
    for m in ours.modules():
        if isinstance(m, MoEFeedForward):
            m.expert_bias.normal_()  # a trained bias must survive the round trip
    ours.save_pretrained(tmp_path)
    back = model.Transformer.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ours(idx), rtol=0, atol=0)
    # transformers must refuse it rather than load a Mixtral with missing weights filled at random.
    from transformers import AutoConfig

    with pytest.raises((ValueError, KeyError), match="zts_moe"):
        AutoConfig.from_pretrained(tmp_path)
