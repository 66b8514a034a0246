"""Tests for lora.py: LoRA math against plain PyTorch, adapters against PEFT, NF4 against bitsandbytes.

References: the LoRA update is checked against x W^T + s x A^T B^T written out in torch; adapter
files and logits against peft 0.21 on a tiny random transformers LlamaForCausalLM (test-only import);
the NF4 code book against bitsandbytes' published table and its quantization error against the
numbers in bitsandbytes' own test suite (tests/test_functional.py::test_4bit_quant).
"""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import (
    LoRALinear,
    _pack,
    _unpack,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    merged_state_dict,
    nf4_bytes_per_param,
    nf4_codebook,
    nf4_dequantize,
    nf4_quantize,
    quantize_nf4,
    save_adapter,
    trainable_report,
    unmerge_lora,
)

# bitsandbytes.functional.create_normal_map() / the NF4 table in bitsandbytes' CUDA kernels (QLoRA, appendix E)
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]  # fmt: skip


# ---- a tiny model with Llama module names (fast; no transformers import) ----


class Block(nn.Module):
    def __init__(self, C=16, Ckv=8, F_=24):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(C, C, bias=True)
        self.self_attn.k_proj = nn.Linear(C, Ckv, bias=False)
        self.self_attn.v_proj = nn.Linear(C, Ckv, bias=False)
        self.self_attn.o_proj = nn.Linear(Ckv, C, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(C, F_, bias=False)
        self.mlp.down_proj = nn.Linear(F_, C, bias=False)

    def forward(self, x):  # not attention, just every projection used once with non-square shapes
        a = self.self_attn
        h = a.q_proj(x)[..., : a.k_proj.out_features] * torch.tanh(a.k_proj(x)) + a.v_proj(x)  # (B,T,Ckv)
        x = x + a.o_proj(h)
        return x + self.mlp.down_proj(F.silu(self.mlp.up_proj(x)))


class Toy(nn.Module):
    def __init__(self, V=32, C=16, L=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(V, C)
        self.model.layers = nn.ModuleList([Block(C) for _ in range(L)])
        self.lm_head = nn.Linear(C, V, bias=False)

    def forward(self, idx):  # idx (B,T) -> logits (B,T,V)
        x = self.model.embed_tokens(idx)
        for block in self.model.layers:
            x = block(x)
        return self.lm_head(x)


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def toy_pair(**kw):
    torch.manual_seed(0)
    base = Toy()
    model = apply_lora(copy.deepcopy(base), **kw)
    idx = torch.randint(0, 32, (2, 5))
    return base, model, idx


def randomize_B(model, std=0.1):
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_(0, std)


# ---- LoRA behaviour ----


def test_init_equals_base_and_peft_init():
    base, model, idx = toy_pair(targets=ALL, r=4, alpha=8)
    assert len(lora_layers(model)) == 12
    assert torch.equal(model(idx), base(idx))  # B = 0 and the frozen path is nn.Linear's op: exact
    for m in lora_layers(model).values():
        A = m.lora_A.weight
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
        assert torch.count_nonzero(m.lora_B.weight) == 0


def test_lora_output_matches_formula_and_rslora():
    for use_rslora in (False, True):
        torch.manual_seed(0)
        lin = nn.Linear(12, 20)
        x = torch.randn(3, 7, 12)
        m = LoRALinear(copy.deepcopy(lin), r=4, alpha=6, use_rslora=use_rslora)
        randomize_B(nn.ModuleDict({"m": m}))
        s = 6 / math.sqrt(4) if use_rslora else 6 / 4
        assert m.scaling == s
        ref = x @ lin.weight.T + lin.bias + s * (x @ m.lora_A.weight.T) @ m.lora_B.weight.T
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)


def test_merged_equals_unmerged():
    base, model, idx = toy_pair(targets=ALL, r=4, alpha=8)
    randomize_B(model)
    unmerged = model(idx)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    torch.testing.assert_close(model(idx), unmerged, rtol=1e-5, atol=1e-6)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, w0[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(idx), unmerged, rtol=1e-5, atol=1e-6)
    # merged_state_dict is the plain layout: it loads strictly into the base architecture
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    torch.testing.assert_close(plain(idx), unmerged, rtol=1e-5, atol=1e-6)


def test_only_lora_params_train():
    base, model, idx = toy_pair(targets=("q_proj", "down_proj"), r=2, alpha=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert len(lora_ids) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)
    assert {id(p) for p in model.parameters() if p.requires_grad} == lora_ids
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # step 1 moves only B (grad A = B^T ... = 0 at init); step 2 moves A too
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in lora_ids), n
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (id(p) in lora_ids), n
    assert "trainable params: 288" in trainable_report(model)  # (q: 2*(16+16) + down: 2*(24+16)) x 2 layers


def test_dropout_only_on_lora_path():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    m = LoRALinear(copy.deepcopy(lin), r=4, alpha=4, dropout=0.5)
    randomize_B(nn.ModuleDict({"m": m}))
    x = torch.randn(4, 16)
    torch.manual_seed(123)
    y = m(x)
    torch.manual_seed(123)
    xd = F.dropout(x, 0.5, training=True)  # the same draw: the only random op in the forward
    ref = lin(x) + (xd @ m.lora_A.weight.T) @ m.lora_B.weight.T  # scaling = 4/4 = 1; base sees plain x
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    m.eval()
    torch.testing.assert_close(m(x), lin(x) + (x @ m.lora_A.weight.T) @ m.lora_B.weight.T, rtol=1e-5, atol=1e-6)


def test_disable_adapters_is_exactly_base():
    base, model, idx = toy_pair(targets=ALL, r=4, alpha=8)
    randomize_B(model)
    with_lora = model(idx)
    assert not torch.allclose(with_lora, base(idx))
    with disable_adapters(model):
        assert torch.equal(model(idx), base(idx))  # DPO's reference model: bit-identical
    assert torch.equal(model(idx), with_lora)
    merge_lora(model)  # a merged model is unmerged inside the block, then merged again
    with disable_adapters(model):
        torch.testing.assert_close(model(idx), base(idx), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(idx), with_lora, rtol=1e-5, atol=1e-6)


def test_user_errors():
    with pytest.raises(ValueError, match="no module name matches"):
        apply_lora(Toy(), targets=("nope",))
    with pytest.raises(ValueError, match="not nn.Linear"):
        apply_lora(Toy(), targets=("embed_tokens",))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(apply_lora(Toy()))
    with pytest.raises(ValueError, match="NF4"):
        merge_lora(apply_lora(Toy(), quantize="nf4", block_size=16))
    with pytest.raises(ValueError, match="quantize"):
        apply_lora(Toy(), quantize="int3")


def test_adapter_round_trip_our_format(tmp_path):
    base, model, idx = toy_pair(targets=ALL, r=4, alpha=8, use_rslora=True)
    randomize_B(model)
    save_adapter(model, tmp_path, base_model_name_or_path="ckpt/base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"]
    assert cfg["base_model_name_or_path"] == "ckpt/base" and sorted(cfg["target_modules"]) == sorted(ALL)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(idx), model(idx))


# ---- NF4 ----


def test_nf4_codebook_is_bitsandbytes_table():
    assert torch.equal(nf4_codebook(), torch.tensor(BNB_NF4, dtype=torch.float32))


def test_nf4_error_matches_bitsandbytes():
    torch.manual_seed(0)
    A = torch.randn(1024, 1024)
    err = (A - nf4_dequantize(nf4_quantize(A, 64), A.shape, 64)).abs()
    # bitsandbytes' test_4bit_quant: nf4, block 64 -> err 0.072792, rel_err 0.203299 (mean of 1k draws).
    # Over seeds 0-2 we get 0.07268-0.07284 (seed-to-seed spread ~1e-4 for 1M values), so +-5e-4 is
    # about 5 sigma; rel_err averages 1/|a| and is heavier-tailed, hence 2e-3.
    assert abs(err.mean().item() - 0.072792) < 5e-4
    assert abs((err / (A.abs() + 1e-8)).mean().item() - 0.203299) < 2e-3


def test_nf4_packing_round_trip():
    codes = torch.randint(0, 16, (1000,), dtype=torch.uint8)
    packed = _pack(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 500
    assert packed[0].item() == codes[0].item() * 16 + codes[1].item()  # first value in the high nibble
    assert torch.equal(_unpack(packed), codes)
    # values that ARE code book values times a block absmax come back exactly, for an odd shape too
    torch.manual_seed(0)
    shape, block = (7, 13), 16  # 91 values: 5 full blocks + 11, odd count -> one padded nibble
    n_blocks = math.ceil(91 / block)
    idx = torch.randint(0, 16, (n_blocks * block,))
    idx[::block] = 15  # every block holds a 1.0, so its absmax is exactly its scale
    scale = torch.rand(n_blocks) + 0.5
    w = (nf4_codebook()[idx] * scale.repeat_interleave(block))[:91].view(shape)
    state = nf4_quantize(w, block)
    assert state["codes"].numel() == 46
    assert torch.equal(nf4_dequantize(state, shape, block), w)


def test_nf4_double_quant():
    torch.manual_seed(0)
    A = torch.randn(1024, 1024)
    s1, s2 = nf4_quantize(A, 64), nf4_quantize(A, 64, double_quant=True)
    b1, b2 = nf4_bytes_per_param(s1, A.numel()), nf4_bytes_per_param(s2, A.numel())
    assert b1 == 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per 64
    # int8 absmax per 64 + fp32 scale per 256 blocks + the fp32 mean (paper: 0.127 bits/param of constants)
    assert b2 == 0.5 + 1 / 64 + 4 * (16384 // 256) / A.numel() + 4 / A.numel()
    e1 = (A - nf4_dequantize(s1, A.shape, 64)).abs().mean()
    e2 = (A - nf4_dequantize(s2, A.shape, 64)).abs().mean()
    # int8 steps on centred absmax (range ~ +-1.5 around ~2.5) are ~0.5% of a constant at most:
    # the mean error grows by well under 0.5%.
    assert e1 <= e2 < e1 * 1.005


def test_qlora_layer_forward_backward():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    m = LoRALinear(copy.deepcopy(lin), r=4, alpha=8, quantize="nf4", double_quant=True)
    assert not any(n.endswith("weight") and "lora" not in n for n, _ in m.named_parameters())
    assert m.nf4_codes.dtype == torch.uint8 and m.nf4_codes.numel() == 64 * 48 // 2
    randomize_B(nn.ModuleDict({"m": m}))
    # reference: plain autograd through a dense copy of the dequantized weight
    W = nf4_dequantize(nf4_quantize(lin.weight, 64, double_quant=True), lin.weight.shape, 64)
    # no value moves more than half the widest NF4 gap (-1.0 .. -0.6962: 0.152) times its block's
    # absmax, plus the int8 absmax error of double quantization (well under 5% of that)
    assert (W - lin.weight).abs().max() <= 1.05 * (1 - 0.6961928) / 2 * lin.weight.abs().max()
    x1 = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1 = m(x1)
    y2 = x2 @ W.T + lin.bias + 2 * (x2 @ m.lora_A.weight.T) @ m.lora_B.weight.T
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert m.lora_A.weight.grad is not None and m.lora_B.weight.grad is not None
    model = apply_lora(Toy(C=64), targets=("q_proj",), quantize="nf4")
    assert "bytes/param" in trainable_report(model) and "0.5625" in trainable_report(model)


# ---- PEFT parity (test-only import of transformers + peft) ----

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random LlamaForCausalLM saved as an HF dir (GQA, non-square MLP), and a token batch."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf_base")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d), torch.randint(0, 64, (2, 9))


def load_hf(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def peft_adapter(hf_base, tmp_path_factory):
    """An adapter written by PEFT (rsLoRA, random nonzero A and B) and PEFT's logits with it."""
    from peft import LoraConfig, get_peft_model

    base_dir, idx = hf_base
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=HF_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(load_hf(base_dir), cfg).eval()  # init_lora_weights=False: B is random too
    d = tmp_path_factory.mktemp("peft_adapter")
    peft_model.save_pretrained(d)
    with torch.no_grad():
        return str(d), peft_model(idx).logits


def test_we_load_peft_adapter(hf_base, peft_adapter):
    base_dir, idx = hf_base
    ad_dir, ref = peft_adapter
    model = load_adapter(load_hf(base_dir), ad_dir)
    assert len(lora_layers(model)) == 2 * 7
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, ref, rtol=1e-5, atol=1e-5)


def test_peft_loads_our_adapter(hf_base, tmp_path):
    from peft import PeftModel

    base_dir, idx = hf_base
    torch.manual_seed(2)
    model = apply_lora(load_hf(base_dir), targets=HF_TARGETS, r=4, alpha=8)
    randomize_B(model)  # nonzero B: a key PEFT failed to load would leave its B at zero and show here
    save_adapter(model, tmp_path, base_model_name_or_path=base_dir)
    peft_model = PeftModel.from_pretrained(load_hf(base_dir), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(idx).logits, model(idx).logits, rtol=1e-5, atol=1e-5)
        merged = peft_model.merge_and_unload()  # PEFT's merge against ours
        ours = load_hf(base_dir)
        ours.load_state_dict(merged_state_dict(model), strict=True)
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_transformer_with_peft_adapter(hf_base, peft_adapter):
    model_mod = pytest.importorskip("model")
    if not hasattr(model_mod.Transformer, "from_pretrained"):
        pytest.skip("model.Transformer.from_pretrained not written yet")
    base_dir, idx = hf_base
    ad_dir, ref = peft_adapter
    ours = load_adapter(model_mod.Transformer.from_pretrained(base_dir).eval(), ad_dir)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref, rtol=1e-4, atol=1e-5)
        # contract 3: an adapter dir loads as base (named by base_model_name_or_path) + adapter
        both = model_mod.Transformer.from_pretrained(ad_dir).eval()
        torch.testing.assert_close(both(idx), ref, rtol=1e-4, atol=1e-5)


def test_qlora_load_adapter_matches_dequantized_base(hf_base, peft_adapter):
    """QLoRA end to end: NF4 base + PEFT adapter == a dense model whose targeted weights are the
    dequantized NF4 ones, + the same adapter (plain nn.Linear forward, no quantized code path)."""
    base_dir, idx = hf_base
    ad_dir, _ = peft_adapter
    qmodel = load_adapter(load_hf(base_dir), ad_dir, quantize="nf4", double_quant=True)
    assert "bytes/param" in trainable_report(qmodel)
    dense = load_hf(base_dir)
    with torch.no_grad():
        for name, m in dense.named_modules():
            if name.rpartition(".")[2] in HF_TARGETS:
                m.weight.copy_(nf4_dequantize(nf4_quantize(m.weight, 64, True), m.weight.shape, 64))
        load_adapter(dense, ad_dir)
        torch.testing.assert_close(qmodel(idx).logits, dense(idx).logits, rtol=1e-5, atol=1e-5)


# ---- 4-bit inference: quantize_nf4 (sample.py / eval.py / serve.py quantize=nf4) ----


def test_quantize_nf4_for_inference_equals_round_tripped_weights():
    """Every block linear becomes NF4Linear: the logits equal the model whose weights went through
    quantize -> dequantize by hand; lm_head and embeddings are untouched; storage is ~0.5625 bytes/param."""
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)  # fmt: skip
    model = Transformer(cfg).eval()
    reference = copy.deepcopy(model)
    linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for n in linears:
            w = reference.get_submodule(n).weight
            w.copy_(nf4_dequantize(nf4_quantize(w), w.shape))
    assert quantize_nf4(model) == len(linears) == 7 * cfg.num_hidden_layers  # q k v o gate up down
    assert isinstance(model.lm_head, nn.Linear) and not any(
        isinstance(m, nn.Linear) for m in model.model.layers.modules()
    )
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        got, want = model(idx), reference(idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    n_params = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in linears)
    n_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".nf4_" in n)
    assert n_bytes / n_params == pytest.approx(0.5 + 4 / 64)
    with pytest.raises(ValueError, match="merge_lora first"):
        quantize_nf4(apply_lora(copy.deepcopy(reference), r=2))
