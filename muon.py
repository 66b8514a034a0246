"""Muon: orthogonalized momentum for the hidden weight matrices, AdamW for everything else.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon; the theory is Bernstein & Newhouse 2024, "Old optimizer, new
norm") updates a weight matrix W (m x n) with the *orthogonalized* momentum of its gradient:

    B_t = mu B_{t-1} + (1 - mu) G_t               momentum, as an exponential average
    M_t = (1 - mu) G_t + mu B_t                   Nesterov: look one momentum step ahead
    O_t = NS(M_t) ~= U V^T   where M_t = U S V^T  orthogonalize: every singular value -> ~1
    W_t = (1 - lr wd) W_{t-1} - lr sqrt(max(1, m/n)) O_t

Why: the gradient of a linear layer is dominated by a few directions (its singular values fall off
fast), so SGD and Adam mostly move W along them. Setting every singular value to 1 gives the rare
directions the same step; it is steepest descent under the spectral norm, the norm that bounds how
much a layer can change its output (Bernstein & Newhouse). sqrt(max(1, m/n)) keeps the update's
RMS per entry similar for tall and wide matrices (Jordan's scaling; torch.optim.Muon's "original").

NS is a Newton-Schulz iteration: no SVD, only matmuls. Scale X = M / ||M||_F (so every singular
value is <= 1), then repeat 5 times the odd quintic polynomial

    X <- a X + b (X X^T) X + c (X X^T)^2 X,       (a, b, c) = (3.4445, -4.7750, 2.0315)

which maps each singular value s to p(s) = a s + b s^3 + c s^5 and leaves U, V alone. The
coefficients make p'(0) = a large, so small singular values grow fast; the price is that the
result oscillates in about [0.7, 1.2] instead of converging to exactly 1, which training does not
mind. X X^T is formed on the short side (transpose tall matrices first), and the iteration runs in
bfloat16 where the hardware multiplies it natively: it is cheap, and the rounding is smaller than the spread the
polynomial leaves anyway. Elsewhere it runs in float32 (see `newton_schulz_dtype`).

Muon is only for 2-D hidden matrices. Embeddings (a lookup: each row sees only its own tokens), the
output head, norm gains and biases keep AdamW, as modded-nanogpt and nanochat do. So this one
optimizer holds both kinds of parameter group: a group with `muon=True` takes the update above,
any other group takes AdamW (Loshchilov & Hutter 2019). One optimizer means one state_dict for
checkpoints and one `optimizer.step()` in the loop. Every group may carry `lr_scale`: its learning
rate is `lr * lr_scale`, so the loop sets one scheduled lr for all groups while Muon runs at its own
(larger) peak.

Under data parallelism (DDP) every rank sees the same all-reduced gradient and computes the same
update. Sharded matrices (FSDP) would need a gather first; train_common refuses that combination.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024: steepest slope at 0 that still settles near 1


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where a bf16 matmul runs on native kernels, else float32.

    GPUs since Ampere (compute capability 8) have them; older ones only emulate bf16. On an x86 CPU, native means
    the AVX512_BF16 or AMX-BF16 instructions. Without them oneDNN emulates those (AVX-512 without bf16,
    although it reports bf16 as supported), or torch falls back to a scalar loop (AVX2 only). Measured, a 256x1024 @
    1024x256 product, 1 thread: 2-core AMD EPYC with AVX2 only, 1.1 GFLOP/s in bf16 vs 116 in fp32 (the demo's
    pretraining ran 4x slower: 546 vs 2,210 tokens/s); 2-core Intel Xeon with AVX-512 but no AVX512_BF16, 27 vs 98.
    float32 there is both faster and more precise. Other CPUs (Arm) also get float32: the safe side.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32  # Ampere+
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()  # what torch's CPU dispatch detected: {"avx512_bf16": True, ...}
        return torch.bfloat16 if caps.get("avx512_bf16") or caps.get("amx_bf16") else torch.float32
    return torch.float32


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7):
    """~U V^T of a matrix g = U S V^T by `steps` quintic Newton-Schulz iterations (in `dtype`).

    g: (m, n), or a stack (k, m, n) of same-shape matrices, each orthogonalized on its own: one batched matmul
    instead of k small ones (fewer calls, the same numbers). Returns g's shape in `dtype`, singular values
    roughly in [0.7, 1.2].
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT  # (..., n, m): the Gram matrix below is then the small (short side)^2 one
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # ||x||_2 <= ||x||_F = 1: singular values in [0, 1]
    for _ in range(steps):
        gram = x @ x.mT  # (..., k, k), k = min(m, n)
        poly = b * gram + c * (gram @ gram)  # b X X^T + c (X X^T)^2
        x = a * x + poly @ x  # p(X) = a X + b X X^T X + c (X X^T)^2 X
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for groups with `muon=True` (2-D tensors only), AdamW for the other groups.

    Group keys: lr, lr_scale (effective lr = lr * lr_scale), weight_decay (decoupled: W *= 1 - lr wd);
    Muon groups: momentum, nesterov, ns_steps; AdamW groups: betas, eps.
    `ns_dtype` is the Newton-Schulz precision: bfloat16 as in Jordan's code and torch.optim.Muon, float32, or None
    (the default) for `newton_schulz_dtype` of each matrix's device.
    """

    def __init__(self, param_groups: list[dict], lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, ns_dtype: torch.dtype | None = None):  # fmt: skip
        defaults = dict(lr=lr, lr_scale=1.0, muon=False, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=betas, eps=eps, weight_decay=weight_decay)  # fmt: skip
        super().__init__(param_groups, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only; give other tensors to AdamW groups")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"] * group["lr_scale"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not group["muon"]:
                for p in params:
                    self._adamw_update(p, group, lr, wd)
                continue
            by_shape = {}  # same-shape matrices (every layer's q_proj, ...) are orthogonalized as one stack
            for p in params:
                by_shape.setdefault((p.shape, p.device), []).append(p)
            for same in by_shape.values():
                self._muon_update(same, group, lr, wd)

    def _muon_update(self, params: list[torch.Tensor], group: dict, lr: float, wd: float) -> None:
        """One Muon step for matrices of one shape."""
        mu, momenta = group["momentum"], []
        for p in params:
            g, state = p.grad, self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g, alpha=1 - mu)  # B = mu B + (1 - mu) G
            momenta.append(g * (1 - mu) + buf * mu if group["nesterov"] else buf)  # Nesterov: (1 - mu) G + mu B
        dtype = self.ns_dtype or newton_schulz_dtype(params[0].device)
        o = orthogonalize(torch.stack(momenta), group["ns_steps"], dtype)  # (k, m, n), singular values ~1
        rows, cols = params[0].shape
        for p, o_p in zip(params, o, strict=True):
            p.mul_(1 - lr * wd)  # decoupled weight decay, with the unscaled lr (as torch.optim.Muon)
            p.add_(o_p.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, rows / cols)))  # tall matrices: larger step

    def _adamw_update(self, p: torch.Tensor, group: dict, lr: float, wd: float) -> None:
        (beta1, beta2), g = group["betas"], p.grad
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)  # first moment
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # second moment
        # Bias correction: both moments start at 0, so early averages are too small by (1 - beta^t).
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.mul_(1 - lr * wd)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
