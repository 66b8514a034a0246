"""Tests for flash_attention.py: the Triton kernel against plain PyTorch attention and autograd through it.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before flash_attention is
imported), which is slow, so shapes are tiny but chosen to hit every path: a single token, tails that are not
a multiple of the tile (17, 100), several tiles per row, GQA groups of 1, 2 and 4, head dims 16/32/64 (and 128
on a GPU), causal and non-causal in the backward too, odd strides. On a GPU (`bash benchmarks/gpu_check.sh`)
the same tests run compiled, plus bf16 and longer sequences.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton fixes compiled-vs-interpreted when it is first imported (its own tl.zeros, tl.sum are jit
        # functions), so nothing done here can switch it any more.
        pytest.skip(
            "triton was imported (by another test file) before TRITON_INTERPRET=1 was set, so its kernels cannot "
            "run on CPU: run this file alone, or set TRITON_INTERPRET=1 in tests/conftest.py when CUDA is absent",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (by flash_attention)
pytest.importorskip("triton")

import flash_attention as fa  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"

# (B, H, H_kv, T, D)
CASES = [
    (1, 2, 2, 1, 16),  # one token: a single, partial tile
    (2, 2, 1, 17, 32),  # tail of 1 past a tile, GQA group 2, batch 2
    (1, 4, 1, 100, 64),  # several tiles per row and per column, GQA group 4
]
if ON_GPU:
    CASES += [(1, 4, 2, 300, 128)]  # fp32 on a GPU compiles slowly (IEEE dots): one D=128 case


def _inputs(B, H, H_kv, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)  # (B, H, T, D)
    k = torch.randn(B, H_kv, T, D, generator=g).to(DEVICE, dtype)  # (B, H_kv, T, D)
    v = torch.randn(B, H_kv, T, D, generator=g).to(DEVICE, dtype)  # (B, H_kv, T, D)
    do = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)  # (B, H, T, D) upstream gradient
    return q, k, v, do


def _grads(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn at (q, k, v) for the upstream gradient do."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _lse_reference(q, k, causal, sm_scale):
    """log-sum-exp of each row of scaled scores, computed directly in float64."""
    T = q.shape[2]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q.double() @ k.double().transpose(-2, -1)) * sm_scale  # (B, H, T, T)
    if causal:
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.logsumexp(s, dim=-1)  # (B, H, T)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}T{}D{}".format(*c))
def test_fp32_forward_lse_and_backward_match_reference(case, causal):
    # The non-causal backward is the check the public Triton tutorial fails: its backward always masks.
    q, k, v, do = _inputs(*case)
    out, dq, dk, dv = _grads(fa.flash_attention, q, k, v, do, causal=causal)
    # Reference in float64 so the comparison measures our fp32 error, not the reference's.
    ref = _grads(fa.attention_reference, *(x.double() for x in (q, k, v, do)), causal=causal)
    torch.testing.assert_close(out, ref[0].float(), rtol=1e-5, atol=1e-6)
    # Gradients sum over T keys/queries in tile order, a different order than one big matmul: a bit looser.
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[1:], strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

    _, lse = fa.flash_attention_forward(q, k, v, causal=causal)
    want = _lse_reference(q, k, causal, 1 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(lse, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_fp16_error_within_a_small_multiple_of_pytorch_fp16(causal):
    # FlashAttention's own oracle: against an fp32 reference, our fp16 error may be at most a small multiple of
    # what plain fp16 PyTorch attention gets (plus a little slack for values where that error is ~0).
    q, k, v, do = _inputs(1, 2, 1, 37, 32, dtype=torch.float16, seed=1)
    ours = _grads(fa.flash_attention, q, k, v, do, causal=causal)
    low = _grads(fa.attention_reference, q, k, v, do, causal=causal)
    ref = _grads(fa.attention_reference, *(x.float() for x in (q, k, v, do)), causal=causal)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, low, ref, strict=True):
        err, base = (a.float() - r).abs().max().item(), (b.float() - r).abs().max().item()
        assert err <= 2 * base + 1e-3, f"{name}: ours {err:.2e} vs PyTorch fp16 {base:.2e}"


@pytest.mark.skipif(not ON_GPU, reason="bf16 needs a GPU: Triton's interpreter has no bf16 arithmetic")
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_error_within_a_small_multiple_of_pytorch_bf16(causal):
    q, k, v, do = _inputs(2, 8, 2, 513, 128, dtype=torch.bfloat16, seed=2)
    ours = _grads(fa.flash_attention, q, k, v, do, causal=causal)
    low = _grads(fa.attention_reference, q, k, v, do, causal=causal)
    ref = _grads(fa.attention_reference, *(x.float() for x in (q, k, v, do)), causal=causal)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, low, ref, strict=True):
        err, base = (a.float() - r).abs().max().item(), (b.float() - r).abs().max().item()
        assert err <= 2 * base + 1e-2, f"{name}: ours {err:.2e} vs PyTorch bf16 {base:.2e}"


def _documents(B, T, lengths_by_row):
    """(B, T) document ids from run lengths per row; a row's runs must sum to T."""
    ids = torch.empty(B, T, dtype=torch.long)
    for b, lengths in enumerate(lengths_by_row):
        assert sum(lengths) == T
        ids[b] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids.to(DEVICE)


# (B, H, H_kv, T, D, document lengths per row): one-token documents, documents that straddle and that align with
# the interpreter's tiles (32 queries x 16 keys forward; 16 x 32 in dK/dV), a row that is one document, GQA 4.
DOC_CASES = [
    (2, 2, 1, 17, 16, [[1, 1, 15], [17]]),
    (1, 4, 1, 100, 32, [[32, 16, 1, 40, 11]]),
    (2, 2, 2, 70, 64, [[5, 30, 35], [64, 6]]),
]


@pytest.mark.parametrize("case", DOC_CASES, ids=lambda c: "B{}H{}Hkv{}T{}D{}".format(*c[:5]))
def test_packed_documents_match_reference(case):
    """document_ids: block-diagonal causal attention, forward and backward, against the masked fp64 reference."""
    *shape, lengths = case
    q, k, v, do = _inputs(*shape)
    docs = _documents(shape[0], shape[3], lengths)
    out, dq, dk, dv = _grads(fa.flash_attention, q, k, v, do, document_ids=docs)
    ref = _grads(fa.attention_reference, *(x.double() for x in (q, k, v, do)), document_ids=docs)
    torch.testing.assert_close(out, ref[0].float(), rtol=1e-5, atol=1e-6)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[1:], strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # A document is independent of the others: the first one alone gives the same output.
    n = lengths[0][0]
    alone = fa.flash_attention(q[:1, :, :n], k[:1, :, :n], v[:1, :, :n])
    torch.testing.assert_close(out[:1, :, :n], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,score", [(torch.float32, -110.0), (torch.float16, -30.0)])
def test_packed_document_whose_tile_starts_in_another_document(dtype, score):
    """A row whose document starts after its first key tile sees only -inf there; its running max must stay -inf
    (not 0), or a row whose visible scores are all very negative underflows to 0 (fp16) or 0/0 (fp32)."""
    T, D = 32, 16
    q, k, v, do = _inputs(1, 1, 1, T, D, dtype=torch.float32, seed=3)
    docs = _documents(1, T, [[20, 12]])
    key = k[0, 0, 20]
    q[0, 0, 20] = score * math.sqrt(D) * key / key.dot(key)  # row 20 sees only key 20, with this scaled score
    q, k, v, do = (x.to(dtype) for x in (q, k, v, do))
    out, dq, dk, dv = _grads(fa.flash_attention, q, k, v, do, document_ids=docs)
    ref = _grads(fa.attention_reference, *(x.double() for x in (q, k, v, do)), document_ids=docs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref, strict=True):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_reused_document_id_starts_a_new_document():
    """Documents are runs of equal ids: [0, 0, 1, 1, 0, 0] is three documents, for the kernel, the reference and
    the dense mask the other attention implementations get."""
    model = pytest.importorskip("model")
    q, k, v, _ = _inputs(1, 2, 1, 6, 16)
    docs = torch.tensor([[0, 0, 1, 1, 0, 0]], device=DEVICE)
    out = fa.flash_attention(q, k, v, document_ids=docs)
    torch.testing.assert_close(out, fa.attention_reference(q, k, v, document_ids=docs), rtol=1e-5, atol=1e-6)
    alone = fa.flash_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:])  # the last run sees nothing before it
    torch.testing.assert_close(out[:, :, 4:], alone, rtol=1e-5, atol=1e-6)
    mask = model.document_mask(docs)
    assert not mask[0, 0, 4, :4].any() and mask[0, 0, 5, 4:6].all()


def test_document_bounds_and_errors():
    starts, ends = fa.document_bounds(torch.tensor([[7, 7, 3, 3, 3, 9]]))
    assert starts.tolist() == [[0, 0, 2, 2, 2, 5]] and ends.tolist() == [[2, 2, 5, 5, 5, 6]]
    q, k, v, _ = _inputs(1, 2, 1, 8, 16)
    with pytest.raises(ValueError, match="need causal=True"):
        fa.flash_attention(q, k, v, causal=False, document_ids=torch.zeros(1, 8, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"document_ids must be \(B, T\) = \(1, 8\)"):
        fa.flash_attention(q, k, v, document_ids=torch.zeros(1, 7, dtype=torch.long, device=DEVICE))


def test_non_contiguous_inputs_and_custom_scale():
    B, H, H_kv, T, D = 1, 2, 1, 33, 16
    q, k, v, do = _inputs(B, H, H_kv, T, D, seed=3)
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, T, D) view of (B, T, H, D) memory
    k_nc = torch.cat([k, torch.zeros_like(k)], dim=-1)[..., :D]  # head dim sliced out of a wider tensor
    v_nc = v.transpose(-2, -1).contiguous().transpose(-2, -1)  # stride along D is T, not 1
    do_nc = do.transpose(1, 2).contiguous().transpose(1, 2)  # the upstream gradient is strided too
    assert not any(x.is_contiguous() for x in (q_nc, k_nc, v_nc, do_nc))
    for causal in (True, False):
        got = _grads(fa.flash_attention, q_nc, k_nc, v_nc, do_nc, causal=causal, sm_scale=0.3)
        want = _grads(fa.attention_reference, *(x.double() for x in (q, k, v, do)), causal=causal, sm_scale=0.3)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


def test_autocast_runs_in_the_autocast_dtype():
    dtype = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter has no bf16
    q, k, v, _ = _inputs(1, 2, 1, 20, 16)
    with torch.autocast(DEVICE, dtype=dtype):
        out = fa.flash_attention(q, k, v)
    assert out.dtype == dtype
    want = fa.attention_reference(q, k, v)
    torch.testing.assert_close(out.float(), want, rtol=0, atol=1e-2)  # one rounding of q, k, v and out


def test_errors_name_the_problem():
    q, k, v, _ = _inputs(1, 4, 2, 8, 16)
    with pytest.raises(ValueError, match="head dim"):
        fa.flash_attention(*(torch.zeros(1, 2, 8, 256, device=DEVICE) for _ in range(3)))
    with pytest.raises(ValueError, match="shape mismatch"):
        fa.flash_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fa.flash_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="4-D"):
        fa.flash_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="dtype"):
        fa.flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="dtype"):
        fa.flash_attention(q.long(), k.long(), v.long())


def test_cpu_tensors_need_interpret_mode(monkeypatch):
    monkeypatch.setattr(fa, "INTERPRET", False)  # as on a machine where TRITON_INTERPRET is unset
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="CUDA"):
        fa.flash_attention(q, q, q)


def test_triton_imported_in_the_other_mode_is_reported(monkeypatch):
    monkeypatch.setattr(fa, "_TRITON_MODE_OK", False)  # as if TRITON_INTERPRET was set after `import triton`
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fa.flash_attention(q, q, q)


@pytest.mark.skipif(ON_GPU, reason="interpreter-only check")
def test_bf16_refused_in_interpreter():
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        fa.flash_attention(q, q, q)


def test_whole_model_triton_matches_sdpa(monkeypatch):
    model = pytest.importorskip("model")
    calls = []  # proves the model really took the Triton path rather than falling back to SDPA
    kernel = fa.flash_attention
    monkeypatch.setattr(fa, "flash_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    torch.manual_seed(0)
    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    ref_model = model.Transformer(model.ModelConfig(**kw, num_key_value_heads=2, attn_impl="sdpa")).to(DEVICE)
    our_model = model.Transformer(model.ModelConfig(**kw, num_key_value_heads=2, attn_impl="triton")).to(DEVICE)
    our_model.load_state_dict(ref_model.state_dict())
    idx = torch.randint(0, 64, (2, 19), device=DEVICE)  # (B, T)
    targets = torch.randint(0, 64, (2, 19), device=DEVICE)
    losses = []
    for m in (ref_model, our_model):
        loss = m(idx, targets)
        loss.backward()
        losses.append(loss.detach())
    assert len(calls) == 2  # one call per layer
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p_ref), p_ours in zip(ref_model.named_parameters(), our_model.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # Packed rows: the kernel takes the document ids, SDPA gets the dense block-diagonal mask; same loss and grads.
    docs = _documents(2, 19, [[4, 15], [10, 2, 7]])
    losses = []
    for m in (ref_model, our_model):
        m.zero_grad()
        loss = m(idx, targets, document_ids=docs)
        loss.backward()
        losses.append(loss.detach())
    assert len(calls) == 4
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p_ref), p_ours in zip(ref_model.named_parameters(), our_model.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_every_config_compiles_for_hopper(tmp_path):
    """The interpreter accepts code the real compiler rejects (types, names bound in one constexpr branch, tiles
    too big for shared memory). benchmarks/compile_check.py runs each autotune config through Triton's sm_90
    pipeline (ptxas included) in a fresh process with an empty cache, so it really compiles; ~1 min on CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(root, "benchmarks", "compile_check.py"), "--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    if proc.returncode == 2:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.count("compiled for sm_90") == 3 and "compile_check: OK" in proc.stdout
