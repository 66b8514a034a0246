"""muon.py against PyTorch's own optimizers: torch.optim.Muon for the matrices, torch.optim.AdamW for the rest.

Both run several steps on the same fixed parameters and gradients. torch.optim.Muon (torch >= 2.9) has
the same defaults as ours: lerp momentum with Nesterov, Jordan's NS coefficients, 5 steps in bfloat16,
decoupled weight decay with the unscaled lr, and adjust_lr_fn=None ("original") = sqrt(max(1, rows/cols)).
"""

import pytest
import torch

from muon import Muon, newton_schulz_dtype, orthogonalize

SHAPES = [(64, 32), (32, 64), (48, 48)]  # tall (scaled step), wide, square
# Same-shape matrices are orthogonalized as one stack (every layer's q_proj, ...): each must still get its own.
REPEATED = [(64, 32), (48, 48), (64, 32), (32, 64), (48, 48), (64, 32)]


def fixed_tensors(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]  # 6 steps of gradients
    return params, grads


def run(optimizer_factory, params, grads):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = optimizer_factory(ps)
    for step_grads in grads:
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shapes", [SHAPES, REPEATED], ids=["distinct", "repeated"])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_muon_matches_torch_muon(nesterov, shapes, ns_dtype):
    params, grads = fixed_tensors(shapes)
    lr, wd, mu = 0.02, 0.1, 0.95
    ref = run(lambda ps: torch.optim.Muon(ps, lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov), params, grads)
    ours = run(
        lambda ps: Muon(
            [{"params": ps, "muon": True}], lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov, ns_dtype=ns_dtype
        ),
        params,
        grads,
    )
    for a, b, p0 in zip(ours, ref, params, strict=True):
        # torch.optim.Muon orthogonalizes in bfloat16. Ours in bf16 orders the matmuls differently (torch fuses them
        # with addmm), ours in fp32 skips bf16's rounding: either way each step's update differs by bf16 rounding,
        # ~1% of an entry of size ~lr. Six steps of size ~lr (0.02, x1.41 for the tall matrix): atol 2e-3 is 10% of
        # one step. A wrong scaling, momentum or decay is >= 1 step.
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
        assert (a - p0).abs().max() > 0.03  # the parameters did move: 15x atol


def test_adamw_groups_match_torch_adamw():
    params, grads = fixed_tensors([(16, 8), (8,), (5, 3)], seed=1)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = run(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), params, grads)
    ours = run(lambda ps: Muon([{"params": ps}], **kw), params, grads)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32, only the order of a few flops differs


def test_mixed_groups_and_lr_scale():
    """A Muon group with lr_scale=s steps as a plain Muon with lr*s; an AdamW group in the same optimizer is untouched
    by it."""
    params, grads = fixed_tensors([(32, 16), (16,)], seed=2)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = Muon([{"params": [ps[0]], "muon": True, "lr_scale": 10.0}, {"params": [ps[1]]}], lr=2e-3)
    for step_grads in grads:
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    alone = run(lambda q: Muon([{"params": q, "muon": True}], lr=2e-2), params[:1], [g[:1] for g in grads])
    torch.testing.assert_close(ps[0].detach(), alone[0], rtol=0, atol=0)  # same ops, same order: bit-equal
    adam = run(lambda q: torch.optim.AdamW(q, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0, foreach=False),
               params[1:], [g[1:] for g in grads])  # fmt: skip
    torch.testing.assert_close(ps[1].detach(), adam[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES + [(256, 704)])
def test_newton_schulz_singular_values_near_one(shape):
    gen = torch.Generator().manual_seed(3)
    # A gradient-like matrix: a few strong directions plus noise, singular values spread over 2 decades.
    u = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=gen))[0]
    v = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=gen))[0]
    k = min(shape)
    s = torch.logspace(0, -2, k)
    g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    for dtype in (torch.float32, torch.bfloat16):
        o = orthogonalize(g, steps=5, dtype=dtype).float()
        assert o.shape == g.shape
        sv = torch.linalg.svdvals(o)
        # Jordan et al.: the quintic leaves singular values in about [0.7, 1.2]. Five steps multiply a tiny one by
        # up to a^5 ~ 480, enough for 1e-2 of the largest (smaller ones stay small: 5 steps is a choice of speed).
        assert sv.min() > 0.6 and sv.max() < 1.25, (dtype, sv.min(), sv.max())
        # Same singular vectors as U V^T: the overlap <O, U V^T> / k equals the mean singular value.
        overlap = (o * (u[:, :k] @ v[:, :k].T)).sum() / k
        assert overlap == pytest.approx(sv.mean().item(), rel=0.02)


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4))], "muon": True}], lr=0.02)


def test_newton_schulz_runs_in_bf16_only_where_the_cpu_has_native_kernels(monkeypatch):
    """Default Muon: bf16 Newton-Schulz where the CPU has bf16 instructions, fp32 where oneDNN would emulate them
    (3.6x slower on an AVX-512 CPU without AVX512_BF16) or torch fall back to a scalar loop (100x slower on an
    AVX2-only CPU). The update computed either way is the one of that explicit dtype."""
    params, grads = fixed_tensors(SHAPES, seed=4)
    cpus = (
        ({"avx512_f": True, "avx512_bf16": True}, torch.bfloat16),  # e.g. AMD Zen 4/5, Intel Cooper Lake
        ({"avx512_f": True, "amx_bf16": True}, torch.bfloat16),  # Intel Sapphire Rapids and later
        ({"avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, torch.float32),  # Intel Skylake-Ice Lake
        ({"avx2": True}, torch.float32),  # AVX2 only
    )
    for caps, want in cpus:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert newton_schulz_dtype(torch.device("cpu")) == want, caps
        auto = run(lambda ps: Muon([{"params": ps, "muon": True}], lr=0.02), params, grads)
        explicit = run(lambda ps, d=want: Muon([{"params": ps, "muon": True}], lr=0.02, ns_dtype=d), params, grads)
        other = run(lambda ps, d=want: Muon([{"params": ps, "muon": True}], lr=0.02,
                                            ns_dtype=torch.float32 if d == torch.bfloat16 else torch.bfloat16),
                    params, grads)  # fmt: skip
        for a, b, c in zip(auto, explicit, other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same dtype, the same ops: bit-equal
            assert not torch.equal(a, c)  # and the other dtype does give different bits, so the check can fail
