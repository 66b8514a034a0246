"""Mixture-of-Experts feed-forward block: top-k routing, load balancing, sort-based dispatch.

A MoE layer replaces the dense SwiGLU MLP of a Transformer block with E expert MLPs and a
router that sends every token to K of them (Shazeer et al. 2017, "Outrageously Large Neural
Networks"; Mixtral, Jiang et al. 2024). Parameters grow with E, compute per token only with K.

Router (`config.router`)
- "softmax" (Mixtral): p = softmax(x W_g); pick the top-k of p; renormalise the k weights to sum 1.
  This is the variant saved in the Hugging Face Mixtral layout.
- "sigmoid_bias" (DeepSeek-V3, arXiv:2412.19437, section 2.1.2): s = sigmoid(x W_g); the experts are
  chosen by top-k of s + b, where b is a per-expert bias that gets no gradient and is nudged after
  every optimizer step toward equal load ("auxiliary-loss-free balancing", `update_bias()`); the
  mixing weights are the chosen s (without b), renormalised to sum 1.
- `router_noise` = eps > 0 multiplies the router's input by uniform(1 - eps, 1 + eps) noise in
  training (the "jitter" of Switch Transformer / Mesh TensorFlow, `router_jitter_noise` in HF
  Mixtral); it makes near-ties between experts flip, so the router explores other assignments.
  The experts still see the clean input.

Auxiliary losses (stored in `self.aux_loss`, already multiplied by their coefficients; the trainer
adds `model.moe_aux_loss()` to the language-model loss itself)
- load balancing (Switch Transformer, Fedus et al. 2021, eq. 4): E * sum_i f_i * P_i, where f_i is
  the fraction of the N*K token-slots sent to expert i and P_i the mean router probability of expert
  i. f is not differentiable, P is; perfect balance (f_i = P_i = 1/E) gives exactly 1.
- router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2; keeps
  the logits small so the softmax stays well conditioned in low precision.

Dispatch (no per-token Python loop)
  The N*K (token, expert) slots are sorted by expert, the tokens gathered into one (N*K, C) tensor
  in which every expert owns a contiguous slice, each expert runs one matmul on its slice, and the
  weighted outputs are summed back per token with index_add_. Slots are laid out choice-major
  (all first choices, then all second choices), so a stable sort puts first choices ahead in each
  expert's queue: with a capacity limit the dropped slots are the lower-priority ones (GShard).
  `capacity_factor` = 0 (the default) is dropless; > 0 caps each expert at
  ceil(capacity_factor * N * K / E) slots per forward and counts what it drops. A dropped slot
  contributes nothing; the token still flows through the residual connection.

Shared experts (DeepSeekMoE, Dai et al. 2024): `n_shared_experts` > 0 adds one always-on SwiGLU MLP
of width n_shared_experts * moe_intermediate_size whose output is added to the routed output.

Checkpoint layout: experts are stacked as `w1` (E,F,C), `w2` (E,C,F), `w3` (E,F,C) (Mixtral's
names: w1 gate, w3 up, w2 down). `hf_checkpoint.experts_to_hf` / `experts_from_hf` convert to and from Mixtral's
per-expert keys `...block_sparse_moe.experts.{j}.w1.weight` when a model is saved or loaded.

Run the tests: `OMP_NUM_THREADS=1 python -m pytest -q tests/test_moe.py`
Benchmark:     `python benchmarks/bench_moe.py`

Shapes: B batch, T time, C channels (hidden_size), F expert width (moe_intermediate_size),
N = B*T tokens, E experts, K top-k.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("softmax", "sigmoid_bias")


class SwiGLU(nn.Module):
    """The dense Llama MLP: down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer").

    The one definition: model.Block uses it as `mlp` in dense layers, MoEFeedForward for its shared experts, and
    the routed experts below compute the same function with stacked (E, F, C) weights. The parameter names are
    Llama's (gate_proj, up_proj, down_proj), so the checkpoint layout is HF's.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (..., F) -> (..., C)


class MoEFeedForward(nn.Module):
    """Routed experts (+ optional shared experts). forward: x (B,T,C) -> (B,T,C).

    After each forward: `self.aux_loss` (scalar tensor in the graph) and `self.metrics` (dict of
    detached tensors, no host sync). In training, `self.load_counts` accumulates slots per expert
    until `update_bias()` consumes them (all-reduce it across ranks first under data parallelism).
    """

    def __init__(self, config):
        super().__init__()
        # moe_intermediate_size = 0 means "as wide as the dense MLP" (ModelConfig's convention)
        C, E = config.hidden_size, config.n_experts
        F_ = config.moe_intermediate_size or config.intermediate_size
        if E < 1:
            raise ValueError(f"n_experts must be >= 1 for a MoE layer, got {E}")
        if not 1 <= config.top_k <= E:
            raise ValueError(f"top_k must be in [1, n_experts={E}], got {config.top_k}")
        if config.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {config.router!r}")
        if config.capacity_factor < 0:
            raise ValueError(f"capacity_factor must be >= 0 (0 = dropless), got {config.capacity_factor}")
        self.n_experts, self.top_k, self.router = E, config.top_k, config.router
        self.aux_loss_coef, self.z_loss_coef = config.aux_loss_coef, config.z_loss_coef
        self.router_noise, self.capacity_factor = config.router_noise, config.capacity_factor
        self.bias_update_rate = config.bias_update_rate
        self.init_std = getattr(config, "initializer_range", 0.02)

        self.gate = nn.Linear(C, E, bias=False)  # router, Mixtral's name
        self.w1 = nn.Parameter(torch.empty(E, F_, C))  # gate projection of every expert
        self.w2 = nn.Parameter(torch.empty(E, C, F_))  # down projection
        self.w3 = nn.Parameter(torch.empty(E, F_, C))  # up projection
        n_shared = config.n_shared_experts
        self.shared_experts = SwiGLU(C, n_shared * F_) if n_shared > 0 else None
        # The selection bias is state worth checkpointing only for the sigmoid router; for softmax
        # it stays out of the state_dict so that the state_dict is exactly Mixtral's.
        self.register_buffer("expert_bias", torch.zeros(E), persistent=config.router == "sigmoid_bias")
        self.register_buffer("load_counts", torch.zeros(E), persistent=False)
        self.aux_loss = torch.zeros(())
        self.metrics = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=None, residual_std=None):
        """Normal(0, std) for the router and input projections, Normal(0, residual_std) for the projections
        that write into the residual stream (w2, shared down_proj; model.py passes std / sqrt(2 L)).
        Both default to config.initializer_range. Zeroes the bias and the load counter."""
        std = self.init_std if std is None else std
        residual_std = std if residual_std is None else residual_std
        for w in (self.gate.weight, self.w1, self.w3):
            w.normal_(0.0, std)
        self.w2.normal_(0.0, residual_std)
        if self.shared_experts is not None:
            self.shared_experts.gate_proj.weight.normal_(0.0, std)
            self.shared_experts.up_proj.weight.normal_(0.0, std)
            self.shared_experts.down_proj.weight.normal_(0.0, residual_std)
        self.expert_bias.zero_()
        self.load_counts.zero_()

    # ---- router ----
    def route(self, x):
        """x (N,C) -> (topk_idx (N,K) long, topk_w (N,K) in x's dtype, probs (N,E) fp32, logits (N,E) fp32)."""
        if self.training and self.router_noise > 0:
            eps = self.router_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)  # (N,C) jittered copy for the router only
        logits = self.gate(x).float()  # (N,E); the router runs in fp32 even under autocast/bf16
        if self.router == "softmax":
            probs = logits.softmax(dim=-1)  # (N,E)
            select = logits
        else:
            scores = torch.sigmoid(logits)  # (N,E) independent per expert, no competition
            probs = scores / scores.sum(dim=-1, keepdim=True)  # (N,E) normalised, for the aux loss/metrics
            select = scores + self.expert_bias  # the bias only changes which experts win
        topk_idx = select.topk(self.top_k, dim=-1).indices  # (N,K)
        gates = probs if self.router == "softmax" else scores
        topk_w = gates.gather(1, topk_idx)  # (N,K) mixing weights, without the bias
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)  # renormalise over the k chosen
        return topk_idx, topk_w.to(x.dtype), probs, logits

    # ---- forward ----
    def forward(self, x):
        B, T, C = x.shape
        E, K = self.n_experts, self.top_k
        x = x.reshape(B * T, C)  # (N,C)
        N = x.shape[0]
        topk_idx, topk_w, probs, logits = self.route(x)

        # Slots in choice-major order: slot s = k*N + n is token n's k-th choice.
        slot_expert = topk_idx.t().reshape(-1)  # (N*K,)
        slot_w = topk_w.t().reshape(-1)  # (N*K,)
        counts = torch.bincount(slot_expert, minlength=E)  # (E,) slots wanted per expert
        order = torch.argsort(slot_expert, stable=True)  # (N*K,) slots grouped by expert
        token = order % N  # (N*K,) which token each sorted slot reads

        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * N * K / E)
            starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted position of each expert
            rank = torch.arange(N * K, device=x.device) - starts[slot_expert[order]]  # place in its queue
            keep = rank < capacity  # (N*K,) first choices come first in every queue
            order, token = order[keep], token[keep]
            kept = counts.clamp(max=capacity)  # (E,)
        else:
            kept = counts

        # One matmul pair per expert on its contiguous slice. The split sizes need one host sync
        # per layer (E integers); a grouped GEMM (torch._grouped_mm) would avoid it on GPUs.
        xs = x[token]  # (S,C) S = kept slots, sorted by expert
        ys = []
        for e, xe in enumerate(xs.split(kept.tolist())):
            if xe.shape[0] == 0:
                continue
            h = F.silu(xe @ self.w1[e].t()) * (xe @ self.w3[e].t())  # (n_e,F)
            ys.append(h @ self.w2[e].t())  # (n_e,C)
        ys = torch.cat(ys) if ys else xs.new_zeros(0, C)  # (S,C)
        ys = ys * slot_w[order].unsqueeze(1)  # (S,C) weighted by the router
        out = torch.zeros_like(x).index_add_(0, token, ys)  # (N,C) sum the K contributions per token

        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        self._losses_and_metrics(probs, logits, counts, kept, N)
        return out.reshape(B, T, C)

    def _losses_and_metrics(self, probs, logits, counts, kept, N):
        """Switch balance loss + z-loss into self.aux_loss; detached per-layer metrics; bias-load accumulator."""
        E, K = self.n_experts, self.top_k
        f = counts.float() / (N * K)  # (E,) fraction of slots per expert, sums to 1
        P = probs.mean(dim=0)  # (E,) mean router probability, carries the gradient
        balance = E * (f * P).sum()  # Switch eq. 4; = 1 at perfect balance
        z = torch.logsumexp(logits, dim=-1).square().mean()  # ST-MoE eq. 5
        self.aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z
        if self.training:
            # Activation checkpointing re-runs this forward in backward and adds the same counts again;
            # that doubles every expert's count alike, so the sign update in update_bias() is unchanged.
            self.load_counts += counts.float()
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
            self.metrics = {
                "load": f.detach(),  # (E,) fraction of slots routed to each expert (before dropping)
                "load_max": f.max().detach() * E,  # 1.0 = perfectly balanced, E = all on one expert
                "load_min": f.min().detach() * E,
                "dropped": (counts - kept).sum().float(),  # slots over capacity in this forward
                "router_entropy": entropy,  # nats, max log(E)
                "balance_loss": balance.detach(),
                "z_loss": z.detach(),
            }

    @torch.no_grad()
    def update_bias(self):
        """DeepSeek-V3 aux-loss-free balancing: b_i += rate * sign(mean load - load_i), then reset counts.

        Call once per optimizer step (after all micro-batches). Under data parallelism all-reduce
        `load_counts` (sum) across ranks first so every rank applies the same update.
        """
        if self.router != "sigmoid_bias":
            return
        self.expert_bias += self.bias_update_rate * torch.sign(self.load_counts.mean() - self.load_counts)
        self.load_counts.zero_()
