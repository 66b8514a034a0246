"""Compile every autotune config of flash_attention.py's kernels for an NVIDIA GPU, on a machine without one.

    python benchmarks/compile_check.py                 # sm_90 (H100/H200), every config, bf16
    python benchmarks/compile_check.py --arch 80 --quick

Triton's interpreter (how the tests run the kernels on CPU) executes the kernel code with numpy and accepts
things the real compiler rejects: a type mismatch, a variable bound only in one constexpr branch, a tile too
big for shared memory. This script sends each kernel through Triton's own pipeline (Triton IR -> TTGIR ->
LLVM -> PTX -> cubin with the bundled ptxas) for the chosen architecture, with every autotune config, head
dims 64 and 128, causal and not, with and without packed documents, and prints the shared memory each
variant needs against the architecture's limit. Nothing runs: it proves the kernels compile, not that
they are correct or fast (the tests and `make gpu-check` do that).

Exit status 0 when everything compiles and fits, 1 otherwise, 2 when this Triton has no CUDA backend.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the compiled mode is the point
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block, opt-in maximum
POINTERS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}  # the input dtype; LSE/DELTA fp32; document bounds int32


def signature_of(jit, constants: dict, dtype: str):
    """Triton's (signature, constexprs) for one specialization of a @triton.jit function."""
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(jit.arg_names, jit.params, strict=True)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name]
        elif name in POINTERS:
            signature[name] = f"*{dtype}"
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name in ("DOC_START", "DOC_END"):
            signature[name] = "*i32" if constants["HAS_DOCS"] else "*fp32"  # the launcher passes lse when unused
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:  # strides, H, GROUP, T, T_TUNE
            signature[name] = "i32"
    return signature, constexprs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10, e.g. 80 (A100), 90 (H100/H200)")
    ap.add_argument("--quick", action="store_true", help="head dim 128 causal only (with and without documents)")
    args = ap.parse_args()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"compile_check: triton without a CUDA backend here ({e})", file=sys.stderr)
        return 2

    import flash_attention as fa

    target = GPUTarget("cuda", args.arch, 32)
    limit = SMEM_LIMIT.get(args.arch, 99 * 1024)
    variants = [(128, True, False), (128, True, True)]
    if not args.quick:
        variants += [(128, False, False), (64, True, False), (64, True, True), (64, False, False)]
    kernels = [("forward", fa._fwd_kernel, fa._FWD_CONFIGS), ("dK/dV", fa._bwd_dkdv_kernel, fa._DKDV_CONFIGS),
               ("dQ", fa._bwd_dq_kernel, fa._DQ_CONFIGS)]  # fmt: skip
    failures = 0
    for name, autotuned, configs in kernels:
        jit, most = autotuned.fn, 0
        for cfg in configs:
            for head_dim, causal, docs in variants:
                constants = dict(cfg.kwargs, HEAD_DIM=head_dim, CAUSAL=causal, PRECISION="tf32", HAS_DOCS=docs)
                what = f"{name} {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages} D={head_dim} " \
                       f"causal={causal} docs={docs}"  # fmt: skip
                try:
                    src = ASTSource(jit, *signature_of(jit, constants, "bf16"))
                    compiled = triton.compile(
                        src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                    )
                except Exception as e:  # the compiler raises many types; each is a failure to report
                    print(f"FAILED {what}: {type(e).__name__}: {str(e)[-800:]}")
                    failures += 1
                    continue
                smem = compiled.metadata.shared
                most = max(most, smem)
                if smem > limit:
                    print(f"TOO BIG {what}: {smem} bytes of shared memory > {limit}")
                    failures += 1
        print(f"{name}: {len(configs)} configs x {len(variants)} variants compiled for sm_{args.arch}, "
              f"largest shared memory {most / 1024:.0f} KiB of {limit / 1024:.0f}")  # fmt: skip
    print("compile_check: OK" if failures == 0 else f"compile_check: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
