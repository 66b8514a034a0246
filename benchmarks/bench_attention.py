"""Speed of our Triton FlashAttention-2 (flash_attention.py) against PyTorch's SDPA flash backend.

For each sequence length T and head dim D it times, interleaved in one run, the forward and the
forward+backward of both implementations on the same bf16 causal inputs, and prints TFLOP/s and the ratio
ours / SDPA (median of repeats; > 1 means ours is faster). Tokens per batch are held at 16k and the model
width at 2048, as in the FlashAttention-2 paper's benchmarks (B = 16384 / T, H = 2048 / D).

FLOPs counted as the FlashAttention papers do: forward = 4 * B * H * T^2 * D (two matmuls), halved when
causal; backward = 2.5x forward (the four gradient matmuls plus one recomputed Q K^T). Our two backward kernels
really run seven (Q K^T and dO V^T are recomputed in both), so the GPU does 3.5x the forward's matmul work; the
convention is kept so that the TFLOP/s compare with the paper's and with SDPA's.

Run on a CUDA machine: `python benchmarks/bench_attention.py [--seqlens 512,1024] [--dims 64,128]`.
The first call per shape autotunes the kernels (a few seconds each); that is warm-up, not timed.
"""

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time_ms(fn):
    """Milliseconds of one call of fn, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _bench(impls, repeats):
    """Median ms of each impl, calls interleaved so clocks and thermals hit all of them alike."""
    times = {name: [] for name in impls}
    for fn in impls.values():  # warm-up: autotuning, compilation, allocator
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for name, fn in impls.items():
            times[name].append(_time_ms(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def _forward(fn, q, k, v):
    def run():
        with torch.no_grad():
            fn(q, k, v)

    return run


def _forward_backward(fn, q, k, v, do):
    def run():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(do)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192", help="comma-separated T values")
    ap.add_argument("--dims", default="64,128", help="comma-separated head dims D")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per implementation (median reported)")
    ap.add_argument("--tokens", type=int, default=16384, help="B * T, held fixed across T")
    ap.add_argument("--width", type=int, default=2048, help="H * D, held fixed across D")
    ap.add_argument("--doc-len", type=int, default=512, help="also time packed rows of this document length (0: no)")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (it times Triton kernels); nothing to measure here.")
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels would run in the CPU interpreter; unset it to benchmark.")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flash_attention as fa

    def sdpa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the flash backend only: no silent fallback
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ours(q, k, v):
        return fa.flash_attention(q, k, v, causal=True)

    impls = {"ours": ours, "sdpa": sdpa}
    print(f"device: {torch.cuda.get_device_name()}, bf16, causal, B*T={args.tokens}, H*D={args.width}")
    header = f"{'T':>6} {'D':>4} {'B':>3} {'H':>3} | {'fwd ours':>9} {'fwd sdpa':>9} {'ratio':>6} | "
    header += f"{'f+b ours':>9} {'f+b sdpa':>9} {'ratio':>6}   (TFLOP/s)"
    print(header)
    print("-" * len(header))
    for D in [int(d) for d in args.dims.split(",")]:
        for T in [int(t) for t in args.seqlens.split(",")]:
            B, H = max(1, args.tokens // T), args.width // D
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, do = (
                torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
            )  # (B, H, T, D) each
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            flops_fwd = 4 * B * H * T * T * D / 2  # causal: half the score matrix
            flops_fb = flops_fwd * 3.5  # forward + backward (2.5x forward)

            t_fwd = _bench({name: _forward(fn, q, k, v) for name, fn in impls.items()}, args.repeats)
            t_fb = _bench({name: _forward_backward(fn, q, k, v, do) for name, fn in impls.items()}, args.repeats)
            tf = lambda flops, ms: flops / (ms * 1e-3) / 1e12
            row = f"{T:>6} {D:>4} {B:>3} {H:>3} | "
            row += f"{tf(flops_fwd, t_fwd['ours']):>9.1f} {tf(flops_fwd, t_fwd['sdpa']):>9.1f} "
            row += f"{t_fwd['sdpa'] / t_fwd['ours']:>6.2f} | {tf(flops_fb, t_fb['ours']):>9.1f} "
            row += f"{tf(flops_fb, t_fb['sdpa']):>9.1f} {t_fb['sdpa'] / t_fb['ours']:>6.2f}"
            print(row, flush=True)
            q = k = v = do = None  # free before the next, larger shape
            torch.cuda.empty_cache()
    kernels = {"forward": fa._fwd_kernel, "dK/dV": fa._bwd_dkdv_kernel, "dQ": fa._bwd_dq_kernel}
    print("autotuned configs for the last shape:", {name: str(k.best_config) for name, k in kernels.items()})
    if args.doc_len:
        packed_documents(args, fa, _bench)


def packed_documents(args, fa, bench):
    """Rows packed with documents of doc_len tokens (SFT packing): our kernel with document_ids against SDPA with
    the dense block-diagonal mask (the memory-efficient backend, the one that takes a mask), forward+backward.
    FLOPs counted as the useful ones: causal attention inside each document."""
    T, D = 4096, 128
    B, H = max(1, args.tokens // T), args.width // D
    ids = (torch.arange(T, device="cuda") // args.doc_len).expand(B, T).contiguous()  # (B, T)
    same = ids[:, :, None] == ids[:, None, :]
    mask = (same & torch.ones(T, T, dtype=torch.bool, device="cuda").tril())[:, None]  # (B, 1, T, T)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    impls = {
        "ours": lambda q, k, v: fa.flash_attention(q, k, v, causal=True, document_ids=ids),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }
    t = bench({name: _forward_backward(fn, q, k, v, do) for name, fn in impls.items()}, args.repeats)
    flops = 4 * B * H * T * args.doc_len * D / 2 * 3.5  # per query about doc_len / 2 keys, forward + backward
    tf = {name: flops / (ms * 1e-3) / 1e12 for name, ms in t.items()}
    print(f"packed documents of {args.doc_len} tokens in rows of T={T}, D={D}: forward+backward "
          f"ours {tf['ours']:.1f} vs SDPA with a mask {tf['sdpa']:.1f} TFLOP/s (useful FLOPs), "
          f"ratio {t['sdpa'] / t['ours']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
