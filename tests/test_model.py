"""Tests for model.py: parity with transformers' LlamaForCausalLM, attention paths, KV cache, checkpoints, sizes.

The independent references are transformers (test-only import), plain PyTorch cross-entropy and
torch.utils.flop_counter. Shapes are tiny so the file runs in well under a minute on one core.
"""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


def tiny_config(**kw):
    base = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return ModelConfig(**base)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny_config(**kw)).eval()


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)


# ---- parity with transformers --------------------------------------------------------------------------------------
ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


@pytest.mark.parametrize("rope", list(ROPE_CASES))
@pytest.mark.parametrize("tied", [False, True])
def test_our_save_hf_load_same_logits(tmp_path, rope, tied):
    model = make_model(rope_scaling=ROPE_CASES[rope], tie_word_embeddings=tied, rope_theta=500.0)
    model.save_pretrained(tmp_path)
    hf = hf_load(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    # 40 tokens > max_position_embeddings=32, so dynamic NTK actually rescales its base
    idx = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_hf_save_our_load_same_logits_sharded(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=32,
        rope_theta=1000.0,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")  # several shards + index, as TinyLlama / Llama-2 ship
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = Transformer.from_pretrained(str(tmp_path)).eval()
    assert ours.config.num_key_value_heads == 1 and ours.config.rope_theta == 1000.0
    idx = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_lazy_state_dict_reads_what_from_pretrained_loads(tmp_path):
    """hf_checkpoint.LazyStateDict (sharded loading reads one tensor at a time) against from_pretrained's full
    state dict: a sharded HF Llama dir, and our Mixtral-layout MoE dir whose per-expert tensors it must stack."""
    from hf_checkpoint import LazyStateDict

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama", max_shard_size="40KB")
    make_model(n_experts=4, top_k=2, moe_intermediate_size=16).save_pretrained(tmp_path / "moe")
    for path in (tmp_path / "llama", tmp_path / "moe"):
        full = {k: v for k, v in Transformer.from_pretrained(str(path)).state_dict().items() if "rope" not in k}
        lazy = LazyStateDict(str(path))
        tied = Transformer.from_pretrained(str(path)).config.tie_word_embeddings
        assert set(lazy) == set(full) - ({"lm_head.weight"} if tied else set()), sorted(set(lazy) ^ set(full))
        for k in lazy:
            assert torch.equal(lazy[k], full[k]), k
    reads = []
    lazy._read = lambda key: reads.append(key)  # a membership test must not touch the files
    assert "model.embed_tokens.weight" in lazy and "nope" not in lazy and reads == []


def test_left_padded_batch_matches_hf_attention_mask(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    hf = hf_load(tmp_path).eval()
    idx = torch.randint(0, 96, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # row 0 is a 7-token prompt, left-padded
    with torch.no_grad():
        ours, ref = model(idx, attention_mask=mask), hf(idx, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


# ---- behaviour -----------------------------------------------------------------------------------------------------
def test_causality():
    model = make_model()
    idx = torch.randint(0, 96, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 96
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_naive_equals_sdpa_gqa(n_kv):
    sdpa = make_model(num_key_value_heads=n_kv, attn_impl="sdpa")
    naive = Transformer(dataclasses.replace(sdpa.config, attn_impl="naive")).eval()
    naive.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 96, (2, 16))
    targets = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(naive(idx), sdpa(idx), rtol=1e-5, atol=1e-5)
    # gradients too: both paths must be differentiable the same way
    naive(idx, targets).backward()
    sdpa(idx, targets).backward()
    for (name, p), q in zip(naive.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_kv_cache_decode_equals_recompute():
    model = make_model()
    idx = torch.randint(0, 96, (2, 14))
    with torch.no_grad():
        full = model(idx)
        cache = model.make_kv_cache(2, max_len=20)
        steps = [model(idx[:, :8], kv_cache=cache, start_pos=0)]  # prefill
        steps.append(model(idx[:, 8:11], kv_cache=cache, start_pos=8))  # a chunk
        steps += [model(idx[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(11, 14)]  # one at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "sdpa"])
def test_kv_cache_ragged_batch_equals_each_prompt_alone(impl):
    """Left-padded prompts of lengths 3, 7, 5 decode exactly as each prompt would on its own."""
    model = make_model(attn_impl=impl)
    lengths, new = [3, 7, 5], 4
    prompts = [torch.randint(0, 96, (n,)) for n in lengths]
    continuation = torch.randint(0, 96, (3, new))  # fixed tokens fed in the decode steps
    T = max(lengths)
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, T - len(p) :], mask[b, T - len(p) :] = p, 1
    with torch.no_grad():
        cache = model.make_kv_cache(3, max_len=T + new)
        batched = [model(idx, kv_cache=cache, start_pos=0, attention_mask=mask)[:, -1]]
        for t in range(new):
            batched.append(model(continuation[:, t : t + 1], kv_cache=cache, start_pos=T + t)[:, -1])
        batched = torch.stack(batched, dim=1)  # (B, new + 1, V)
        for b, p in enumerate(prompts):
            alone = model(torch.cat([p, continuation[b]])[None])[0, len(p) - 1 :]  # (new + 1, V)
            torch.testing.assert_close(batched[b], alone, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(model(idx, attention_mask=mask)).all()  # pad queries stay finite


def test_loss_reductions_match_cross_entropy():
    model = make_model()
    idx = torch.randint(0, 96, (2, 10))
    targets = torch.randint(0, 96, (2, 10))
    targets[0, :4] = -1
    logits = model(idx)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none").view(2, 10)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 10) and (per_token[0, :4] == 0).all()
    torch.testing.assert_close(per_token, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(idx, targets), ref.sum() / 16, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(model(idx, torch.full_like(targets, -1)))  # nothing to predict: 0, not NaN


def test_head_only_at_targets_gives_the_same_losses_and_gradients():
    # only_targets=True runs lm_head on the positions with a target only (fine-tuning batches); the reference is
    # F.cross_entropy over the full logits. Packed rows too, as train_sft and train_dpo call it.
    model = make_model()
    idx = torch.randint(0, 96, (3, 12))
    targets = torch.randint(0, 96, (3, 12))
    targets[0, :5] = -1  # a prompt
    targets[1, 7:] = -1  # padding
    targets[2] = -1  # a row with nothing to predict
    doc = torch.tensor([[0] * 12, [1] * 6 + [2] * 6, [3] * 12])
    ref = F.cross_entropy(model(idx, document_ids=doc).flatten(0, 1), targets.flatten(), ignore_index=-1,
                          reduction="none").view(3, 12)  # fmt: skip
    ref.sum().backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    got = model(idx, targets, loss_reduction="none", document_ids=doc, only_targets=True)
    assert got.shape == (3, 12) and (got[targets == -1] == 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    for name, p in model.named_parameters():  # the skipped positions had no gradient to give
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    mean = model(idx, targets, document_ids=doc, only_targets=True)
    torch.testing.assert_close(mean, ref.sum() / (targets != -1).sum(), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
    plain = make_model()
    noisy = Transformer(dataclasses.replace(plain.config, dropout=0.2, attention_dropout=0.2))
    noisy.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 96, (2, 12))
    noisy.train()
    assert not torch.allclose(noisy(idx), noisy(idx))
    noisy.eval()
    torch.testing.assert_close(noisy(idx), plain(idx), rtol=0, atol=0)


def test_gradient_checkpointing_same_gradients():
    model = make_model(dropout=0.0).train()
    ckpt = Transformer(tiny_config(gradient_checkpointing=True)).train()
    ckpt.load_state_dict(model.state_dict())
    idx, targets = torch.randint(0, 96, (2, 12)), torch.randint(0, 96, (2, 12))
    model(idx, targets).backward()
    ckpt(idx, targets).backward()
    for p, q in zip(model.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_meta_init_and_depth_scaled_std():
    cfg = tiny_config(hidden_size=256, intermediate_size=512, num_hidden_layers=8, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.lm_head.weight.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # re-tied after to_empty
    layer = model.model.layers[3]
    assert abs(layer.mlp.up_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(layer.mlp.down_proj.weight.std().item() - 0.02 / 4) < 3e-4  # 0.02 / sqrt(2 * 8 layers)
    assert (layer.input_layernorm.weight == 1).all()
    assert torch.isfinite(model(torch.randint(0, 96, (1, 8)))).all()


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def test_save_load_bit_exact_and_tokenizer_files(tmp_path):
    model = make_model(tie_word_embeddings=True)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"\x00sp")
    (tok / "tokenizer_config.json").write_text("{}")
    model.save_pretrained(str(tmp_path / "ckpt"), tokenizer_dir=str(tok))
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= files
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"} and "lm_head.weight" not in f.keys()
    loaded = Transformer.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    idx = torch.randint(0, 96, (2, 9))
    assert torch.equal(model(idx), loaded(idx))
    half = Transformer.from_pretrained(str(tmp_path / "ckpt"), dtype="bfloat16")
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Transformer.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        Transformer.from_pretrained(str(tmp_path))
    make_model().save_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle"):
        Transformer.from_pretrained(str(tmp_path))


def test_config_from_transformers4_style_json():
    """config.json as TinyLlama / Llama 3.1 ship it (transformers 4.x keys: rope_theta + rope_scaling, a list of
    eos ids) gives the same shapes as our preset; transformers' own LlamaConfig agrees on the RoPE parameters."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_attention_heads": 32,
        "num_hidden_layers": 22,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "vocab_size": 32000,
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
        "pretraining_tp": 1,
    }
    cfg = ModelConfig.from_hf(d)
    preset = ModelConfig.from_preset("tinyllama-1.1b")
    assert dataclasses.replace(cfg, eos_token_id=2) == preset
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    cfg = ModelConfig.from_hf({**d, "rope_scaling": scaling, "rope_theta": 500000.0})
    assert cfg.rope_scaling == scaling and cfg.rope_theta == 500000.0
    hf = transformers.LlamaConfig(**{**d, "rope_scaling": scaling, "rope_theta": 500000.0})
    assert hf.rope_parameters == {**scaling, "rope_theta": 500000.0}


def test_from_preset_rejects_unknown(tmp_path, monkeypatch):
    import model as model_module

    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("no-such-size")
    (tmp_path / "bad.yaml").write_text("hidden_size: 64\nnum_attention_heads: 4\nn_layer: 3\n")
    monkeypatch.setattr(model_module, "PRESET_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_preset("bad")


def test_moe_blocks_aux_loss_and_round_trip(tmp_path):
    pytest.importorskip("moe")
    model = make_model(n_experts=4, top_k=2, moe_layers=[1], router="sigmoid_bias", moe_intermediate_size=32)
    assert hasattr(model.model.layers[0], "mlp") and hasattr(model.model.layers[1], "block_sparse_moe")
    dense = make_model()
    assert dense.moe_aux_loss().item() == 0 and dense.moe_metrics() == {}
    model.model.layers[1].block_sparse_moe.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    idx = torch.randint(0, 96, (2, 8))
    model.train()
    model(idx)
    aux = model.moe_aux_loss()
    assert aux.ndim == 0 and aux.requires_grad and set(model.moe_metrics()) == {"layer1"}
    model.eval()
    logits = model(idx)
    model.save_pretrained(str(tmp_path))
    # A dense layer 0 and the sigmoid router: Mixtral would compute something else, so it is not called mixtral.
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "zts_moe"
    loaded = Transformer.from_pretrained(str(tmp_path)).eval()
    assert loaded.config == model.config  # moe_layers / router survive as extra config.json keys
    assert torch.equal(loaded(idx), logits)


def test_adapter_dir_loads_base_plus_adapter(tmp_path):
    lora = pytest.importorskip("lora")
    model = make_model()
    model.save_pretrained(str(tmp_path / "base"))
    lora.apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at 0; make the adapter change the output
    lora.save_adapter(model, str(tmp_path / "adapter"), str(tmp_path / "base"))
    loaded = Transformer.from_pretrained(str(tmp_path / "adapter")).eval()
    idx = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=1e-5, atol=1e-6)


# ---- sizes ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [("tiny", 4.0e6), ("0.5B", 0.5e9), ("tinyllama-1.1b", 1.1e9), ("llama2-7b", 6.74e9)],  # Llama 2 paper: 6.74B
)
def test_preset_parameter_counts(name, expected):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(name))
    assert abs(model.num_parameters() / expected - 1) < 0.02


def test_preset_matches_hf_count():
    """Our count of the TinyLlama preset equals transformers' count of the same shapes (on the meta device)."""
    cfg = ModelConfig.from_preset("tinyllama-1.1b")
    from hf_checkpoint import config_to_hf

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items() if k not in ("dtype",)})
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
        ours = Transformer(cfg)
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_flop_estimate_matches_flop_counter(tied):
    # naive attention: FlopCounterMode has no formula for the CPU flash-SDPA kernel, but counts plain matmuls
    model = make_model(tie_word_embeddings=tied, attn_impl="naive").train()
    B, T = 2, 32
    idx, targets = torch.randint(0, 96, (B, T)), torch.randint(0, 96, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, targets).backward()
    measured = counter.get_total_flops() / (B * T)
    assert abs(measured / model.estimate_flops_per_token(T) - 1) < 0.01
