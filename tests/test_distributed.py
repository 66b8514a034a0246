"""Tests for distributed.py / fsdp.py / planner.py: 2 processes on CPU (gloo), spawned by torch.multiprocessing.

References: single-process training on the same global batch, PyTorch's DistributedDataParallel and fully_shard
(FSDP2), and bytes measured on real tensors for the planner. Each spawn runs several checks, because starting two
Python processes with torch is the slow part. Assertions run inside the workers; a failure surfaces as an exception
with the worker's traceback, within seconds: conftest.spawn kills the other rank rather than let it wait in a
collective, and every spawn and collective has a timeout.
"""

import os

import pytest
import torch
from conftest import ROOT, spawn

import checkpoint
import distributed
import planner
from model import ModelConfig, Transformer

WORLD = 2
B, T, STEPS = 4, 16, 10  # global batch (split over ranks), sequence length, optimizer steps


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def make_model(cfg, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def adamw(model):
    """AdamW with the repo's decay rule (train_common): decay iff getattr(p, "decay", p.dim() >= 2)."""
    decay = [p for p in model.parameters() if getattr(p, "decay", p.dim() >= 2)]
    rest = [p for p in model.parameters() if not getattr(p, "decay", p.dim() >= 2)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)


def batches(cfg, steps=STEPS, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(steps)]


def train(model, opt, data, info=None, accum=1, clip=None):
    """Per-step losses. With info, each rank takes its slice of every global batch, split into `accum` micro-steps;
    without, the whole global batch in one go (the single-process reference)."""
    losses = []
    for batch in data:
        local = distributed.split_batch(batch, info) if info else batch
        micro = local.chunk(accum) if info else [local]
        total = torch.zeros(())
        for i, mb in enumerate(micro):
            sync = i == len(micro) - 1
            with distributed.maybe_no_sync(model, skip_sync=not sync):
                loss = model(mb[:, :-1], mb[:, 1:])
                (loss / len(micro)).backward()  # mean over micro-steps = mean over the rank's slice
            total += loss.detach() / len(micro)
        if clip is not None:
            distributed.clip_grad_norm_(model, clip) if info else torch.nn.utils.clip_grad_norm_(
                model.parameters(), clip
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        if info:
            torch.distributed.all_reduce(total)
            total /= info.world_size
        losses.append(total.item())
    return losses


def assert_close_sd(a: dict, b: dict, rtol, atol):
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def persistent_bytes(model, opt) -> int:
    """Bytes this rank keeps between steps: parameters, gradients and optimizer state."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------------------
def _ddp_worker(info):
    cfg = tiny_config()
    data = batches(cfg)
    # Different seeds per rank: only the broadcast in DDP makes the replicas equal.
    ours = distributed.wrap_model(make_model(cfg, seed=info.rank), "ddp", info, bucket_mb=0.01)
    ours_losses = train(ours, adamw(ours), data, info, accum=2)
    theirs = distributed.wrap_model(make_model(cfg, seed=0), "torch_ddp", info)
    theirs_losses = train(theirs, adamw(theirs), data, info, accum=2)

    ref = make_model(cfg, seed=0)
    ref_losses = train(ref, adamw(ref), data)
    torch.testing.assert_close(ours_losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert_close_sd(distributed.full_state_dict(ours), ref.state_dict(), rtol=1e-4, atol=1e-5)
    # Against PyTorch's DDP: same all-reduce sums, only bucket boundaries differ, so the match is tighter.
    torch.testing.assert_close(ours_losses, theirs_losses, rtol=1e-6, atol=1e-6)
    assert_close_sd(distributed.full_state_dict(ours), distributed.full_state_dict(theirs), rtol=1e-5, atol=1e-6)
    assert len(ours.buckets) > 1  # the test really exercised several buckets launched from hooks


def test_ddp_matches_single_process_and_torch_ddp():
    spawn(_ddp_worker)


# ---------------------------------------------------------------------------------------------------------------------
# FSDP
# ---------------------------------------------------------------------------------------------------------------------
def _fsdp_worker(info):
    cfg = tiny_config()
    data = batches(cfg)
    ref = make_model(cfg, seed=0)
    ref_losses = train(ref, adamw(ref), data, clip=0.5)
    ref_sd = ref.state_dict()

    # ZeRO-3 with prefetch; ZeRO-2; ZeRO-3 with activation checkpointing (recompute inside the unit's backward).
    variants = [dict(prefetch=True), dict(zero2=True, prefetch=False), dict(prefetch=False, checkpointing=True)]
    for opts in variants:
        c = tiny_config(gradient_checkpointing=opts.pop("checkpointing", False))
        ours = distributed.wrap_model(make_model(c, seed=info.rank), "fsdp", info, **opts)
        losses = train(ours, adamw(ours), data, info, accum=2, clip=0.5)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5, msg=lambda m, opts=opts: f"{opts}: {m}")
        assert_close_sd(distributed.full_state_dict(ours), ref_sd, rtol=1e-4, atol=1e-5)

    # Against fully_shard (FSDP2): same sharding idea, same fp32 reduce-scatter.
    ours = distributed.wrap_model(make_model(cfg, seed=0), "fsdp", info)
    theirs = distributed.wrap_model(make_model(cfg, seed=0), "torch_fsdp2", info)
    opt_ours, opt_theirs = adamw(ours), adamw(theirs)
    torch.testing.assert_close(train(ours, opt_ours, data, info), train(theirs, opt_theirs, data, info),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert_close_sd(distributed.full_state_dict(ours), distributed.full_state_dict(theirs), rtol=1e-4, atol=1e-6)
    # What a checkpoint save uses: the same tensors on rank 0 only, nothing held on the other ranks.
    for model in (ours, theirs):
        everywhere, only0 = distributed.full_state_dict(model), distributed.full_state_dict(model, rank0_only=True)
        if info.rank == 0:
            assert only0.keys() == everywhere.keys() and all(torch.equal(only0[k], everywhere[k]) for k in only0)
        else:
            assert only0 == {}

    # Memory: FSDP keeps ~1/world of DDP's parameters + gradients + Adam state (padding and no buffers aside).
    ddp = distributed.wrap_model(make_model(cfg), "ddp", info)
    opt_ddp = adamw(ddp)
    train(ddp, opt_ddp, data[:1], info)
    for p in ddp.parameters():
        p.grad = torch.zeros_like(p)  # measure with gradients allocated, as during backward
    for p in ours.parameters():
        p.grad = torch.zeros_like(p)
    ddp_bytes, fsdp_bytes = persistent_bytes(ddp, opt_ddp), persistent_bytes(ours, opt_ours)
    assert abs(fsdp_bytes / ddp_bytes - 1 / WORLD) < 0.01, (fsdp_bytes, ddp_bytes)
    # The planner's fp32 numbers for the same model agree with what was measured.
    plan = planner.plan(cfg, world_size=WORLD, seq_len=T, micro_batch=B // WORLD, mixed_precision=False)
    for mode, measured in (("ddp", ddp_bytes), ("fsdp", fsdp_bytes)):
        predicted = sum(plan["memory"][mode][k] for k in ("params", "grads", "optimizer"))
        assert abs(predicted / measured - 1) < 0.01, (mode, predicted, measured)

    # bf16 compute with fp32 master shards, against fully_shard with the same MixedPrecisionPolicy.
    ours = distributed.wrap_model(make_model(cfg, seed=0), "fsdp", info, mixed_precision=True)
    theirs = distributed.wrap_model(make_model(cfg, seed=0), "torch_fsdp2", info, mixed_precision=True)
    l_ours, l_theirs = train(ours, adamw(ours), data[:4], info), train(theirs, adamw(theirs), data[:4], info)
    torch.testing.assert_close(l_ours, l_theirs, rtol=0, atol=2e-2)  # bf16 compute: rounding differs per op order
    assert all(p.dtype == torch.float32 for p in ours.parameters())


def test_fsdp_matches_single_process_torch_fsdp2_and_memory():
    spawn(_fsdp_worker)


# ---------------------------------------------------------------------------------------------------------------------
# MoE
# ---------------------------------------------------------------------------------------------------------------------
def _moe_worker(info):
    cfg = tiny_config(n_experts=4, top_k=2, moe_intermediate_size=32, tie_word_embeddings=False)
    data = batches(cfg, steps=4)

    def aux_train(model, opt, info=None):
        """LM loss + the router's auxiliary loss, which the trainer (not the model) adds."""
        losses = []
        for batch in data:
            x = distributed.split_batch(batch, info) if info else batch
            loss = model(x[:, :-1], x[:, 1:]) + distributed.unwrap(model).moe_aux_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return losses

    # Reference: PyTorch's DDP (an expert may get no token on one rank, hence find_unused_parameters).
    ref = distributed.wrap_model(make_model(cfg, seed=0), "torch_ddp", info, find_unused_parameters=True)
    ref_losses = torch.stack(aux_train(ref, adamw(ref), info))
    for mode in ("ddp", "fsdp"):
        model = distributed.wrap_model(make_model(cfg, seed=info.rank), mode, info)
        losses = torch.stack(aux_train(model, adamw(model), info))
        # Each rank's loss (its own tokens and its own load-balancing loss) is compared with the same rank's.
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5, msg=lambda m, mode=mode: f"{mode}: {m}")
        assert_close_sd(distributed.full_state_dict(model), distributed.full_state_dict(ref), rtol=1e-4, atol=1e-5)


def test_moe_under_ddp_and_fsdp():
    pytest.importorskip("moe")
    spawn(_moe_worker)


# ---------------------------------------------------------------------------------------------------------------------
# meta-device initialization
# ---------------------------------------------------------------------------------------------------------------------
def meta_model(cfg, seed):
    torch.manual_seed(seed)
    with torch.device("meta"):
        return Transformer(cfg)


def _meta_worker(info, tmp):
    import weakref

    from fsdp import FSDP
    from hf_checkpoint import LazyStateDict

    dense = tiny_config(num_hidden_layers=4)
    sigmoid_moe = tiny_config(n_experts=4, top_k=2, moe_intermediate_size=16, tie_word_embeddings=False,
                              router="sigmoid_bias")  # fmt: skip
    tied_shared_moe = tiny_config(n_experts=4, top_k=1, moe_intermediate_size=16, n_shared_experts=1, moe_layers=[1])
    for cfg in (dense, sigmoid_moe, tied_shared_moe):
        # The unsharded path: the whole model materialized, then init_weights (what a single process does).
        ref = meta_model(cfg, seed=3)
        ref.to_empty(device="cpu")
        ref.init_weights()
        for mode in ("fsdp", "ddp", "torch_fsdp2"):
            wrapped = distributed.wrap_model(meta_model(cfg, seed=3), mode, info)
            sd = distributed.full_state_dict(wrapped)
            want = ref.state_dict()
            assert sd.keys() == want.keys(), (mode, sorted(set(sd) ^ set(want)))
            for k in want:
                assert torch.equal(sd[k], want[k]), (mode, k)  # bit for bit: same draws in the same order
            x = torch.randint(0, cfg.vocab_size, (2, 9))
            with torch.no_grad():
                torch.testing.assert_close(wrapped(x), ref(x), rtol=1e-5, atol=1e-6)
            if mode == "ddp":
                continue
            # Sharded resume: other weights read from a checkpoint dir one tensor at a time, each rank keeping a slice.
            other = meta_model(cfg, seed=4)
            other.to_empty(device="cpu")
            other.init_weights()
            ckpt = os.path.join(tmp, f"other_{cfg.n_experts}_{cfg.n_shared_experts}")
            if info.rank == 0 and not os.path.isdir(ckpt):
                other.save_pretrained(ckpt)
            torch.distributed.barrier()
            distributed.load_full_state_dict(wrapped, LazyStateDict(ckpt))
            got, want = distributed.full_state_dict(wrapped), other.state_dict()
            assert all(torch.equal(got[k], want[k]) for k in want), mode

    # Never whole: while a meta model is sharded, at most the root's parameters and one block are materialized.
    model = meta_model(dense, seed=3)
    for m in model.modules():
        for key, buf in m._buffers.items():
            m._buffers[key] = torch.empty_like(buf, device="cpu")
    model.init_non_parameters()
    alive, peak = [], [0]

    def counting_init(name, t):
        model.init_parameter(name, t)
        alive.append(weakref.ref(t))
        peak[0] = max(peak[0], sum(r().numel() for r in alive if r() is not None))

    root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    # gloo may keep the last tensor it broadcast referenced for a moment after the call returns (a CI run saw one
    # block parameter still alive when the next block began): allow that one parameter, never a second block.
    largest = max(p.numel() for p in model.model.layers[0].parameters())
    FSDP(model, list(model.model.layers), device=torch.device("cpu"), init_parameter=counting_init)
    assert root + block + largest >= peak[0] > block, (peak[0], root, block, largest)
    assert root + block + largest < root + 2 * block  # the bound above still rules out two whole blocks


def test_meta_device_model_is_initialized_unit_by_unit_with_the_same_weights(tmp_path):
    spawn(_meta_worker, str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def _ckpt_worker(info, tmp):
    cfg = tiny_config()
    data = batches(cfg, steps=6)
    for mode in ("ddp", "fsdp"):
        # Uninterrupted run.
        model = distributed.wrap_model(make_model(cfg), mode, info)
        opt = adamw(model)
        full_losses = train(model, opt, data, info, accum=2)
        final = distributed.full_state_dict(model)
        # Interrupted: save after 3 steps as the training loops do (checkpoint.py: gathered weights, the optimizer
        # state per rank under fsdp), then a fresh model (different init) resumes from those files.
        model = distributed.wrap_model(make_model(cfg), mode, info)
        opt = adamw(model)
        first = train(model, opt, data[:3], info, accum=2)
        per_rank = mode == "fsdp"
        gathered = distributed.full_state_dict(model, rank0_only=True)  # collective: every rank takes part
        raw = distributed.unwrap(model)
        path = checkpoint.save_checkpoint(
            os.path.join(tmp, mode), 3, info.rank, lambda d, raw=raw, sd=gathered: raw.save_pretrained(d, state_dict=sd),
            checkpoint.optimizer_tensors(opt), {}, keep_last=1, per_rank_optimizer=per_rank,
        )  # fmt: skip
        model = distributed.wrap_model(make_model(cfg, seed=7), mode, info)
        opt = adamw(model)
        distributed.load_full_state_dict(model, Transformer.from_pretrained(path).state_dict())
        state, opt_tensors = checkpoint.load_train_state(path, info.rank, per_rank_optimizer=per_rank)
        checkpoint.load_optimizer_tensors(opt, opt_tensors, state["optimizer"])
        assert state["step"] == 3
        rest = train(model, opt, data[3:], info, accum=2)
        assert first + rest == full_losses  # bit-exact: same shards, same optimizer state, same order of ops
        resumed = distributed.full_state_dict(model)
        for k in final:
            assert torch.equal(final[k], resumed[k]), k
    # The gathered FSDP state dict and the logits it gives, for the world-1 check in the parent process.
    x = data[0][:, :-1].contiguous()
    with torch.no_grad():
        logits = model(x)  # a collective under FSDP: every rank runs it
    if info.rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in final.items() if k != "lm_head.weight"}, os.path.join(tmp, "full.st"))
        save_file({"x": x, "logits": logits}, os.path.join(tmp, "expect.st"))


def test_sharded_resume_exact_and_full_checkpoint_loads_at_world_1(tmp_path):
    from safetensors.torch import load_file

    spawn(_ckpt_worker, str(tmp_path))
    # World 1, no process group: the gathered state dict is a plain Transformer state dict.
    model = Transformer(tiny_config())
    sd = load_file(str(tmp_path / "full.st"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: safetensors refuses to store shared tensors
    model.load_state_dict(sd)
    expect = load_file(str(tmp_path / "expect.st"))
    torch.testing.assert_close(model(expect["x"]), expect["logits"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# a failing rank fails the test, it does not hang it
# ---------------------------------------------------------------------------------------------------------------------
def _one_rank_fails_worker(info):
    if info.rank == 1:
        raise AssertionError("rank 1 broke before the all-reduce")
    torch.distributed.all_reduce(torch.ones(3))  # rank 0 waits here for a peer that will never come


def test_a_failing_rank_fails_the_spawn_with_its_own_error():
    """Rank 0 is stuck in a collective when rank 1 raises. spawn must kill rank 0 and raise rank 1's traceback;
    had it waited instead, the error would be rank 0's collective timeout (a minute later), or a hang."""
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessRaisedException, match="rank 1 broke before the all-reduce"):
        spawn(_one_rank_fails_worker)


def _different_models_worker(info):
    # Rank 1 read a different config (CI once saw this: a model file being rewritten while a rank read it).
    cfg = tiny_config(num_hidden_layers=2 if info.rank == 0 else 3)
    sizes = [[p.numel() for p in make_model(tiny_config(num_hidden_layers=n)).parameters()] for n in (2, 3)]
    want = (f"rank 1 built a different model from rank 0 ({len(sizes[1])} tensors, {sum(sizes[1]):,} weights vs "
            f"{len(sizes[0])}, {sum(sizes[0]):,}): every rank must read the same model config")  # fmt: skip
    for mode in ("ddp", "fsdp"):
        with pytest.raises(ValueError) as e:
            distributed.wrap_model(make_model(cfg), mode, info)
        assert str(e.value) == want  # on both ranks: both stop, neither waits in a broadcast
    distributed.wrap_model(make_model(tiny_config()), "ddp", info)  # the same model passes (and the group is fine)


def test_ranks_that_built_different_models_stop_at_wrap_with_one_line():
    """Without the check, the broadcast of rank 0's weights pairs tensors of different sizes: gloo aborts the
    process with "Received data size doesn't match expected size", or a smaller model is silently overwritten."""
    spawn(_different_models_worker)


# ---------------------------------------------------------------------------------------------------------------------
# single-process pieces
# ---------------------------------------------------------------------------------------------------------------------
def test_helpers_and_errors():
    info = distributed.DistInfo(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"), backend="gloo")
    assert distributed.split_batch(torch.arange(4), info).tolist() == [2, 3]
    with pytest.raises(ValueError, match="not divisible"):
        distributed.split_batch(torch.arange(3), info)
    with pytest.raises(ValueError, match="parallel"):
        distributed.wrap_model(torch.nn.Linear(2, 2), "zero9", info)


def saved_bytes_per_token(cfg, regime: str, B=3, T=37) -> float:
    """Bytes of activations autograd keeps in one forward, per token, measured with saved-tensor hooks: every saved
    tensor's storage counted once, leaving out parameters and autocast's copies of them (same shape as a weight)."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    if regime == "bf16":
        model = model.to(torch.bfloat16)
    weights = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned and tuple(t.shape) not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t  # kept alive by the graph, so no two saved tensors share an address by reuse

    x, y = torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=regime != "fp32"):
            model(x, y)
    return sum(seen.values()) / (B * T)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_planner_activations_match_what_autograd_saves(moe):
    """planner.py's per-token counts against bytes measured on CPU in its three regimes: one layer is the difference
    between a 2- and a 1-layer model, the head is the rest. Dense layers are counted tensor by tensor (measured equal,
    1% allowed); MoE routing bookkeeping is counted roughly (0.6% off, 2% allowed; 6% under autocast over fp32, whose
    extra casts of gathered tokens are not modelled, 10% allowed); the head is 1-3% low (5% allowed)."""
    extra = dict(n_experts=4, top_k=2, moe_intermediate_size=48, n_shared_experts=1) if moe else {}
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, attn_impl="sdpa", **extra)  # fmt: skip
    one, two = ModelConfig(num_hidden_layers=1, **base), ModelConfig(num_hidden_layers=2, **base)
    for regime, (c, r, casts) in {"fp32": (4, 4, False), "autocast": (2, 4, True), "bf16": (2, 2, False)}.items():
        m1, m2 = saved_bytes_per_token(one, regime), saved_bytes_per_token(two, regime)
        layer_est = planner.activation_bytes_per_token_layer(one, 0, c, r, casts)
        head_est = planner.head_bytes_per_token(one, c, r)
        tol = 0.01 if not moe else (0.10 if regime == "autocast" else 0.02)
        assert abs(layer_est / (m2 - m1) - 1) < tol, (regime, layer_est, m2 - m1)
        assert abs(head_est / (2 * m1 - m2) - 1) < 0.05, (regime, head_est, 2 * m1 - m2)


def test_planner_matches_known_numbers():
    cfg = ModelConfig.from_preset("llama2-7b")
    p = planner.plan(cfg, world_size=8, seq_len=4096, micro_batch=1)
    assert abs(p["params"] / 6.738e9 - 1) < 0.01
    n = p["params"]
    mem = p["memory"]
    # ZeRO paper (Rajbhandari et al. 2020, section 3): mixed-precision Adam keeps 16 bytes per parameter, all of
    # them replicated under DDP and 1/N of them per GPU under ZeRO-2/3; ZeRO-2 also holds the full bf16 weights.
    ddp = mem["ddp"]["params"] + mem["ddp"]["grads"] + mem["ddp"]["optimizer"]
    assert ddp == pytest.approx(16 * n, rel=1e-6)
    fsdp = mem["fsdp"]["params"] + mem["fsdp"]["grads"] + mem["fsdp"]["optimizer"]
    assert fsdp == pytest.approx(16 * n / 8, rel=1e-6)
    assert mem["zero2"]["gathered"] >= 2 * n
    assert mem["fsdp"]["gathered"] < mem["zero2"]["gathered"] / 4
    assert p["flops_per_token"] > 6 * n
    assert mem["fsdp+ckpt"]["activations"] < mem["fsdp"]["activations"]


def test_planner_reads_a_training_recipe_that_names_its_model():
    """configs/pretrain_tiny.yaml says `model: tiny`: the planner sizes the preset it names (a string broke it)."""
    recipe = planner.plan(os.path.join(ROOT, "configs", "pretrain_tiny.yaml"), world_size=2)
    preset = planner.plan(os.path.join(ROOT, "configs", "model", "tiny.yaml"), world_size=2)
    assert recipe["params"] == preset["params"] == Transformer(ModelConfig.from_preset("tiny")).num_parameters()
