"""FlashAttention-2 in Triton: a fused forward and backward for (grouped-query) attention.

What: `flash_attention(q, k, v, causal=True, sm_scale=None)` computes softmax(q k^T * sm_scale) v without
ever writing the (T, T) score matrix to memory, forward and backward, plus `attention_reference`, the same
math in plain PyTorch that the tests trust.

How (Dao, "FlashAttention-2", 2023, https://arxiv.org/abs/2307.08691, algorithms 1 and 2):
- Forward: one program per (tile of BLOCK_M queries, batch*head). It walks over key/value tiles keeping a
  running row max m and row sum l ("online softmax", Milakov & Gimelshein 2018), rescales its fp32
  accumulator when the max grows, divides once at the end and saves the log-sum-exp LSE = m + log(l)
  per row: 4 bytes per query instead of T floats.
- Backward: P is recomputed tile by tile from the saved LSE (P = exp(S - LSE), no max or sum needed).
  A preprocess kernel computes delta = rowsum(dO * O), which equals rowsum(P * dP) (Dao et al. 2022,
  FlashAttention, appendix B.2), so dS = P * (dP - delta). One kernel owns a key tile and accumulates dK, dV over every query tile that
  sees it; another owns a query tile and accumulates dQ. Neither needs atomics, so results are
  deterministic.
- Causal and non-causal are both honoured in all three kernels (the public Triton tutorial's backward
  always applies the causal mask). Tiles wholly visible run without a mask; only the diagonal tiles
  (causal) or the last, partial tile (non-causal) pay for one.
- Grouped-query attention (Ainslie et al. 2023): query head h reads K/V head h // (H // H_kv) through
  pointer arithmetic, never a repeated copy. The dK/dV kernel loops over the group of query heads that
  share its K/V head, so the group's sum happens in registers instead of in a (B, H, T, D) buffer.
- Packed rows (document_ids, causal): query m sees key n when start[m] <= n <= m, start[m] being where its
  document begins; key tiles before a query tile's earliest start are skipped, and the dK/dV sweep stops at
  the end of the last document touching its key tile, so no work is spent across documents (the varlen idea of
  FlashAttention-2, here on fixed-length rows).
- Any T (tails are masked), head dim D in {16, 32, 64, 128}, fp16/bf16/fp32, any strides. fp32 inputs
  use IEEE-precision dots (not TF32), so fp32 means fp32.
- Scores are kept in base 2 (scaled by log2(e)) because exp2 is the native GPU instruction.

Tuning: on a GPU each kernel is autotuned over a few H100/H200 tile shapes, once per power-of-two bucket of
T; fp32 gets one small fixed tile. FLASH_ATTENTION_AUTOTUNE=0 keeps the first config (quick compiled tests).

Interpret mode: with TRITON_INTERPRET=1 in the environment *before triton is first imported* (triton fixes
the mode for its own helpers then, and for ours at @triton.jit time), the kernels run on CPU tensors through
Triton's numpy interpreter with small fixed tiles. That is how the tests run without a GPU. bf16 is GPU only
(the interpreter has no bf16 math). Without triton (macOS, CPU-only installs) this file still imports;
calling the kernel raises.

Run: `TRITON_INTERPRET=1 python -m pytest -q tests/test_flash_attention.py` (CPU) or
`bash benchmarks/gpu_check.sh` (GPU: compiled tests + `benchmarks/bench_attention.py`).

Shapes: B batch, H query heads, H_kv key/value heads, T time, D head dim.
"""

import math
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # a hack, admitted: stand-ins so the kernel definitions below still parse without triton
    from types import SimpleNamespace

    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda **kw: lambda fn: fn, Config=lambda *a, **kw: None)
    tl = SimpleNamespace(constexpr=None)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # what @triton.jit sees for the kernels below
# Triton's own helpers (tl.zeros, tl.sum, ...) were built compiled or interpreted when triton was first imported;
# our kernels only work if that agrees with INTERPRET.
_TRITON_MODE_OK = not HAS_TRITON or (type(tl.zeros).__name__ == "InterpretedFunction") == INTERPRET
AUTOTUNE = os.environ.get("FLASH_ATTENTION_AUTOTUNE", "1") != "0"  # 0: first config only (quick compiled tests)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


def _configs(gpu, cpu_tile):
    """Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU; one small fixed tile in the
    interpreter (a single config means no tuning runs)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": cpu_tile[0], "BLOCK_N": cpu_tile[1]}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in gpu]


def _prune(fp32_tile):
    """fp32 is the exactness path, not the speed path: IEEE dots are register hungry and slow to compile, so
    it gets one small tile and no tuning. FLASH_ATTENTION_AUTOTUNE=0 keeps only the first (default) config."""

    def prune(configs, named_args, **kwargs):
        if kwargs.get("PRECISION") == "ieee":
            return [triton.Config({"BLOCK_M": fp32_tile[0], "BLOCK_N": fp32_tile[1]}, num_warps=4, num_stages=2)]
        return configs if AUTOTUNE else configs[:1]

    return {"early_config_prune": prune}


# H100/H200 search space, kept small because every config is compiled (seconds each) before it is timed.
# Skipping the mask on whole tiles needs BLOCK_M % BLOCK_N == 0 in the forward and dQ kernels, and
# BLOCK_N % BLOCK_M == 0 in the dK/dV kernel (the backward owns BLOCK_N keys x BLOCK_M queries per step).
_FWD_CONFIGS = _configs(
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)],
    cpu_tile=(32, 16),
)
_DKDV_CONFIGS = _configs(
    [(32, 128, 4, 2), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)], cpu_tile=(16, 32)
)
_DQ_CONFIGS = _configs(
    [(128, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)], cpu_tile=(32, 16)
)
# Tuned per power-of-two bucket of T (T_TUNE), so batches of varying length (SFT) reuse one tuning result.
_TUNE_KEY = ["T_TUNE", "HEAD_DIM", "CAUSAL", "GROUP", "HAS_DOCS"]


# ---- forward ----


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
               lo, hi, T, qk_scale, q_start, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr):  # fmt: skip
    """Fold key/value tiles [lo, hi) into the running (acc, l, m) of one query tile. With HAS_DOCS (packed rows)
    query m also needs key n >= q_start[m], the first position of its own document."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        if MASK:  # the partial last tile and/or the causal diagonal
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)  # (BLOCK_N, D)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            if HAS_DOCS:
                keep = keep & (offs_n[None, :] >= q_start[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,); finite: every row sees key 0 in its first tile
        m_exp = m_new
        if HAS_DOCS:  # ...but not with documents: a row may see nothing yet. Exponentiate against 0 then (all
            # terms are exp2(-inf) = 0) while the running max itself stays -inf until the row's first real key.
            m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_exp)  # rescales what was accumulated under the old max
        p = tl.math.exp2(s - m_exp[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (BLOCK_M, D)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune((64, 32)))
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, DOC_START, stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh,
                stride_kt, stride_kd, stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot,
                stride_od, H, GROUP, T, T_TUNE, qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    # Causal tiles near the end of the sequence do the most work; launch them first for a better tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)  # int64: B*H*T*D can pass 2^31 elements
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP  # grouped-query attention: shared K/V head, no copy
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # (BLOCK_M, D)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running unnormalized output

    if HAS_DOCS:  # packed rows (causal): key tiles from the tile's earliest document start, all masked
        # Rows past T pretend to start at T - 1: they see one key (finite, never stored) and do not lower `lo`.
        q_start = tl.load(DOC_START + off_b * T + offs_m, mask=offs_m < T, other=T - 1)  # (BLOCK_M,)
        lo = (tl.min(q_start, 0) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                   offs_m, offs_d, lo, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, q_start,
                                   BLOCK_N, True, CAUSAL, PRECISION, True)  # fmt: skip
    else:
        if CAUSAL:  # keys before the tile's first query are visible to all its rows; the diagonal needs a mask
            full_hi = start_m
            hi = tl.minimum(start_m + BLOCK_M, T)
        else:  # every whole key tile is visible; only the partial last one needs a mask
            full_hi = (T // BLOCK_N) * BLOCK_N
            hi = T
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                   offs_m, offs_d, 0, full_hi, T, qk_scale, offs_m, BLOCK_N, False, CAUSAL,
                                   PRECISION, False)  # fmt: skip
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                   offs_m, offs_d, full_hi, hi, T, qk_scale, offs_m, BLOCK_N, True, CAUSAL,
                                   PRECISION, False)  # fmt: skip

    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # natural-log LSE, what the backward reads
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


# ---- backward ----


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_od, stride_dob, stride_doh,
                           stride_dot, stride_dod, H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """delta = rowsum(dO * O), (B, H, T) fp32: the softmax-backward term shared by every key tile."""
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < T
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
    o = tl.load(o_ptrs, mask=row_mask, other=0.0)  # (BLOCK_M, D)
    do = tl.load(do_ptrs, mask=row_mask, other=0.0)  # (BLOCK_M, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, stride_qt, stride_qd,
                    stride_dot, stride_dod, offs_n, offs_d, lo, hi, T, qk_scale, BLOCK_M: tl.constexpr,
                    MASK: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr):  # fmt: skip
    """Add the contribution of query tiles [lo, hi) of one query head to a key tile's dK, dV."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # Rows past T load as zeros (dO = 0, delta = 0), so they add exactly nothing to dK or dV.
        q = tl.load(
            q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=offs_m[:, None] < T, other=0.0
        )
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=offs_m[:, None] < T,
                     other=0.0)  # fmt: skip
        lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634  # base 2
        delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        # Work with transposed scores (keys x queries) so dV = P^T dO and dK = dS^T Q need no transposes.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])  # probabilities recomputed from the saved LSE
        if MASK:  # causal diagonal: key n is seen by query m only when n <= m
            keep = offs_n[:, None] <= offs_m[None, :]
            if HAS_DOCS:  # ...and only by queries of its own document
                q_start = tl.load(start_base + offs_m, mask=offs_m < T, other=T)  # (BLOCK_M,)
                keep = keep & (offs_n[:, None] >= q_start[None, :])
            p_t = tl.where(keep, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # (BLOCK_N, D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])  # softmax backward; sm_scale applied once at the end
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # (BLOCK_N, D)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune((16, 32)))
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END, stride_qb, stride_qh, stride_qt,
                     stride_qd, stride_kb,
                     stride_kh, stride_kt, stride_kd, stride_vb, stride_vh, stride_vt, stride_vd, stride_dob,
                     stride_doh, stride_dot, stride_dod, stride_dkb, stride_dkh, stride_dkt, stride_dkd, stride_dvb,
                     stride_dvh, stride_dvt, stride_dvd, H, GROUP, T, T_TUNE, sm_scale, qk_scale,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One program per (key tile, batch * K/V head): dK, dV summed over the GROUP query heads sharing it."""
    pid_bhkv = tl.program_id(1)
    H_kv = H // GROUP
    off_b = (pid_bhkv // H_kv).to(tl.int64)
    off_hkv = (pid_bhkv % H_kv).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # Key rows past T load as zeros; their dK, dV rows are computed but never stored.
    kv_mask = offs_n[:, None] < T
    k_ptrs = K + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, D)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    start_base = DOC_START + off_b * T
    if HAS_DOCS:  # no query past the end of the last document in this key tile sees any of its keys
        doc_hi = tl.max(tl.load(DOC_END + off_b * T + offs_n, mask=offs_n < T, other=0), 0)

    for g in range(GROUP):  # grouped-query attention: sum over the query heads that read this K/V head
        off_h = off_hkv * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base = LSE + (off_b * H + off_h) * T
        delta_base = DELTA + (off_b * H + off_h) * T
        if HAS_DOCS:  # packed rows (causal): queries from the key tile to the end of its last document, masked
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, stride_qt,
                                     stride_qd, stride_dot, stride_dod, offs_n, offs_d, start_n, doc_hi, T, qk_scale,
                                     BLOCK_M, True, PRECISION, True)  # fmt: skip
        else:
            if CAUSAL:  # queries before start_n see none of these keys; those in the key tile's span see some
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, stride_qt,
                                         stride_qd, stride_dot, stride_dod, offs_n, offs_d, start_n,
                                         start_n + BLOCK_N, T, qk_scale, BLOCK_M, True, PRECISION, False)  # fmt: skip
                lo = start_n + BLOCK_N
            else:
                lo = 0
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, stride_qt,
                                     stride_qd, stride_dot, stride_dod, offs_n, offs_d, lo, T, T, qk_scale, BLOCK_M,
                                     False, PRECISION, False)  # fmt: skip

    dk *= sm_scale  # S = sm_scale * Q K^T, so dK = sm_scale * dS^T Q
    dk_ptrs = (
        DK + off_b * stride_dkb + off_hkv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
    )
    dv_ptrs = (
        DV + off_b * stride_dvb + off_hkv * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
    )
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
                  lo, hi, T, qk_scale, q_start, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                  PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr):  # fmt: skip
    """Add the contribution of key tiles [lo, hi) to one query tile's dQ."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        if MASK:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)  # (BLOCK_N, D)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            if HAS_DOCS:
                keep = keep & (offs_n[None, :] >= q_start[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # (BLOCK_M, D)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune((32, 32)))
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC_START, stride_qb, stride_qh, stride_qt, stride_qd, stride_kb,
                   stride_kh,
                   stride_kt, stride_kd, stride_vb, stride_vh, stride_vt, stride_vd, stride_dob, stride_doh,
                   stride_dot, stride_dod, stride_dqb, stride_dqh, stride_dqt, stride_dqd, H, GROUP, T, T_TUNE,
                   sm_scale, qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                   HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One program per (query tile, batch * head): dQ, walking the key tiles like the forward does."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < T

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
    q = tl.load(q_ptrs, mask=row_mask, other=0.0)  # (BLOCK_M, D)
    do = tl.load(do_ptrs, mask=row_mask, other=0.0)  # (BLOCK_M, D)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if HAS_DOCS:  # as in the forward: from the tile's earliest document start, all masked
        q_start = tl.load(DOC_START + off_b * T + offs_m, mask=offs_m < T, other=T - 1)  # (BLOCK_M,)
        lo = (tl.min(q_start, 0) // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m,
                           offs_d, lo, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, q_start, BLOCK_N, True, CAUSAL,
                           PRECISION, True)  # fmt: skip
    else:
        if CAUSAL:
            full_hi = start_m
            hi = tl.minimum(start_m + BLOCK_M, T)
        else:
            full_hi = (T // BLOCK_N) * BLOCK_N
            hi = T
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m,
                           offs_d, 0, full_hi, T, qk_scale, offs_m, BLOCK_N, False, CAUSAL, PRECISION,
                           False)  # fmt: skip
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m,
                           offs_d, full_hi, hi, T, qk_scale, offs_m, BLOCK_N, True, CAUSAL, PRECISION,
                           False)  # fmt: skip

    dq *= sm_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_mask)


# ---- Python side: checks, launches, autograd ----


def _check_inputs(q, k, v):
    if not HAS_TRITON:
        raise RuntimeError("flash_attention needs triton (pip install triton); use attention_reference or SDPA")
    if not _TRITON_MODE_OK:
        raise RuntimeError(
            "TRITON_INTERPRET changed between the first import of triton and the import of flash_attention; "
            "set it before anything imports triton"
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (B, H, T, D), (Bk, H_kv, Tk, Dk) = q.shape, k.shape
    if k.shape != v.shape or Bk != B or Tk != T or Dk != D:
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "want q (B, H, T, D), k and v (B, H_kv, T, D)"
        )
    if H % H_kv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads H_kv={H_kv}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if T == 0 or B == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype among float16/bfloat16/float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("bfloat16 needs a GPU: Triton's interpreter has no bfloat16 arithmetic; use float16/float32")
    if not q.is_cuda and not INTERPRET:
        raise ValueError(
            f"flash_attention needs CUDA tensors (got {q.device}); "
            "set TRITON_INTERPRET=1 before triton is imported to run on CPU"
        )


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp16/bf16 dots ignore it; fp32 gets true fp32


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends), each (B, T) int32: the first position and one past the last of each token's document, for
    rows packed as runs of equal ids. Query m may see key n when starts[m] <= n <= m."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    first = torch.ones_like(document_ids, dtype=torch.bool)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # (B, T) a document begins here
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]  # (B, T) a document ends here
    starts = torch.cummax(torch.where(first, idx, 0), dim=1).values
    ends = torch.cummin(torch.where(last, idx + 1, T).flip(1), dim=1).values.flip(1)
    return starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()


def _forward(q, k, v, causal, sm_scale, docs=None):
    B, H, T, D = q.shape
    o = torch.empty_like(q)  # keeps q's layout when dense, e.g. (B, T, H, D) memory for a transposed q
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # (B, H, T)
    starts = docs[0] if docs is not None else lse  # unused without documents (HAS_DOCS=False)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _fwd_kernel[grid](q, k, v, o, lse, starts, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H,
                      H // k.shape[1], T, triton.next_power_of_2(T), sm_scale * LOG2E, HEAD_DIM=D, CAUSAL=causal,
                      PRECISION=_precision(q.dtype), HAS_DOCS=docs is not None)  # fmt: skip
    return o, lse


def _backward(do, q, k, v, o, lse, causal, sm_scale, docs=None):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    delta = torch.empty_like(lse)  # (B, H, T)
    _bwd_preprocess_kernel[(triton.cdiv(T, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), H, T, HEAD_DIM=D,
                                                         BLOCK_M=64)  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(HEAD_DIM=D, CAUSAL=causal, PRECISION=_precision(q.dtype), HAS_DOCS=docs is not None)
    starts, ends = docs if docs is not None else (lse, lse)  # unused without documents
    t_tune = triton.next_power_of_2(T)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H_kv)
    _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, starts, ends, *q.stride(), *k.stride(), *v.stride(),
                           *do.stride(), *dk.stride(), *dv.stride(), H, H // H_kv, T, t_tune, sm_scale,
                           sm_scale * LOG2E, **common)  # fmt: skip
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, starts, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                         *dq.stride(), H, H // H_kv, T, t_tune, sm_scale, sm_scale * LOG2E, **common)  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """autograd glue: saves (q, k, v, o, lse), never the (T, T) probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, docs):
        o, lse = _forward(q, k, v, causal, sm_scale, docs)
        ctx.save_for_backward(q, k, v, o, lse, *(docs or ()))
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *docs = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, tuple(docs) or None)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal=True, sm_scale=None, document_ids=None):
    """softmax(q k^T * sm_scale [+ causal mask]) v. q (B, H, T, D), k/v (B, H_kv, T, D) -> (B, H, T, D).

    sm_scale defaults to 1/sqrt(D). Differentiable in q, k, v. Any strides are accepted. Under torch.autocast the
    inputs are cast to the autocast dtype first, as autocast does for SDPA (else fp32 q would run fp32 dots).
    document_ids (B, T), causal only: rows packed with several sequences, each a run of equal ids; a token attends
    only to earlier tokens of its own run (block-diagonal causal), and key tiles before a query tile's earliest
    document are skipped, so packing costs no attention work across documents.
    """
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    _check_inputs(q, k, v)
    docs = None
    if document_ids is not None:
        if not causal:
            raise ValueError("document_ids (packed rows) need causal=True")
        if tuple(document_ids.shape) != (q.shape[0], q.shape[2]) or document_ids.device != q.device:
            raise ValueError(f"document_ids must be (B, T) = {(q.shape[0], q.shape[2])} on {q.device}, "
                             f"got {tuple(document_ids.shape)} on {document_ids.device}")  # fmt: skip
        docs = document_bounds(document_ids)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), sm_scale, docs)


def flash_attention_forward(q, k, v, causal=True, sm_scale=None):
    """Forward only, no autograd: (out (B, H, T, D), lse (B, H, T) fp32, natural log)."""
    _check_inputs(q, k, v)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _forward(q, k, v, bool(causal), sm_scale)


def attention_reference(q, k, v, causal=True, sm_scale=None, document_ids=None):
    """The same attention in plain PyTorch, computed in the inputs' dtype; materializes (B, H, T, T)."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, D): the copy the kernel avoids
    v = v.repeat_interleave(group, dim=1)  # (B, H, T, D)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    att = (q @ k.transpose(-2, -1)) * sm_scale  # (B, H, T, T)
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        if document_ids is not None:  # (B, 1, T, T): same run of ids (a document) and not in the future
            change = torch.ones_like(document_ids, dtype=torch.bool)
            change[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
            run = change.cumsum(1)  # (B, T) index of each token's run: a repeated id later is a new document
            mask = mask & (run[:, :, None] == run[:, None, :])[:, None]
        att = att.masked_fill(~mask, float("-inf"))
    return torch.softmax(att, dim=-1) @ v  # (B, H, T, D)
