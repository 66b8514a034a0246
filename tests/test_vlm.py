"""vlm.py, vlm_data.py, train_vlm.py: vision attention vs a plain reference in every kernel, the encoder vs an
independent ViT, the image splice vs transformers' inputs_embeds, files, data by construction, and training
(stage 1 leaves the LM bit-identical; a short CPU run lifts held-out VQA accuracy far above chance)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MICRO_MODEL, ROOT
from safetensors import safe_open
from safetensors.torch import load_file

import lora
import train_vlm
import vlm
import vlm_data
from config import ConfigError, UserError, load_yaml, parse_args
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
              num_attention_heads=2)  # fmt: skip


def ref_attention(q, k, v):
    """Plain bidirectional softmax attention, written out here."""
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return att @ v


def ref_rmsnorm(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_encoder(enc: vlm.VisionEncoder, pixels):
    """The ViT forward from the weights alone: unfold into patches, matmul, attention, SwiGLU, RMSNorm."""
    c = enc.config
    P, C = c.patch_size, c.hidden_size
    patches = F.unfold(pixels, kernel_size=P, stride=P).transpose(1, 2)  # (B, N, 3*P*P), row-major patches
    x = patches @ enc.patch_embedding.weight.reshape(C, -1).T + enc.patch_embedding.bias + enc.position_embedding
    B, N, _ = x.shape
    for blk in enc.layers:
        a = blk.self_attn
        h = ref_rmsnorm(x, blk.input_layernorm.weight, c.rms_norm_eps)
        q, k, v = (
            lin(h).view(B, N, c.num_attention_heads, -1).transpose(1, 2) for lin in (a.q_proj, a.k_proj, a.v_proj)
        )
        x = x + a.o_proj(ref_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        h = ref_rmsnorm(x, blk.post_attention_layernorm.weight, c.rms_norm_eps)
        m = blk.mlp
        x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
    return ref_rmsnorm(x, enc.norm.weight, c.rms_norm_eps)


def have_triton():
    try:
        import triton  # noqa: F401

        import flash_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


IMPLS = ["naive", "sdpa", pytest.param("triton", marks=pytest.mark.skipif(not have_triton(), reason="no triton"))]


@pytest.fixture(scope="module")
def tok(tiny_data_dir):
    return Tokenizer(tiny_data_dir)


def micro_vlm(tok, seed=0, attn_impl="sdpa", **vision):
    torch.manual_seed(seed)
    lm = Transformer(ModelConfig(**{**load_yaml(MICRO_MODEL), "vocab_size": tok.vocab_size}))
    return vlm.VLM(vlm.VisionConfig(**{**VISION, "attn_impl": attn_impl, **vision}), lm, tok.pad_id)


# ----------------------------------------------------------------------------- the vision tower


@pytest.mark.parametrize("impl", IMPLS)
def test_vision_attention_matches_reference(impl):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 16, requires_grad=True) for _ in range(3))  # (B, H, N, D)
    out = vlm.vision_attention(q, k, v, impl)
    ref = ref_attention(q, k, v)
    tol = dict(rtol=1e-5, atol=1e-6) if impl != "triton" else dict(rtol=1e-4, atol=1e-5)  # kernel: blockwise sums
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_matches_independent_vit(impl):
    torch.manual_seed(0)
    enc = vlm.VisionEncoder(vlm.VisionConfig(**{**VISION, "attn_impl": impl}))
    pixels = torch.randn(3, 3, 32, 32)
    out = enc(pixels)
    assert out.shape == (3, 16, 32)  # (B, N, C_v): (32 / 8)^2 patches
    tol = dict(rtol=1e-5, atol=1e-5) if impl != "triton" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref_encoder(enc, pixels), **tol)


def test_vision_attention_is_bidirectional():
    torch.manual_seed(0)
    enc = vlm.VisionEncoder(vlm.VisionConfig(**VISION))
    pixels = torch.randn(1, 3, 32, 32)
    changed = pixels.clone()
    changed[..., 24:, 24:] += 1.0  # only the last patch
    assert (enc(pixels)[0, 0] - enc(changed)[0, 0]).abs().max() > 1e-4  # the first patch sees the last one
    with pytest.raises(ValueError, match="pixels must be"):
        enc(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vlm.VisionEncoder(vlm.VisionConfig(image_size=30, patch_size=8))


# ----------------------------------------------------------------------------- prompts and the splice


def test_render_with_image_keeps_render_chat_layout(tok):
    N = 16
    msgs = [{"role": "user", "content": "hi <image> there"}, {"role": "assistant", "content": "red"}]
    ids, mask = vlm.render_with_image(tok, msgs, N)
    ref_ids, ref_mask = tok.render_chat([{"role": "user", "content": ""}, msgs[1]])
    content = tok.encode("hi ") + [tok.pad_id] * N + tok.encode(" there")
    assert ids == ref_ids[:2] + content + ref_ids[2:]  # <s><|user|> content <|end|><|assistant|>red<|end|>
    assert mask == ref_mask[:2] + [0] * len(content) + ref_mask[2:]
    assert ids.count(tok.pad_id) == N
    prompt, _ = vlm.render_with_image(tok, msgs[:1], N, add_generation_prompt=True)
    assert prompt[-1] == tok.special_id("assistant")
    for bad in ([{"role": "user", "content": "no image"}], [{"role": "user", "content": "<image><image>"}],
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>"}]):  # fmt: skip
        with pytest.raises(ValueError):
            vlm.render_with_image(tok, bad, N)


@pytest.mark.parametrize("turns", [1, 3])
def test_collate_targets_only_answers(tok, turns):
    rows = vlm_data.make_examples(3, turns=turns)
    x, y, pixels = vlm.collate(rows, tok, vlm.VisionConfig(**VISION), max_len=96)
    assert pixels.shape == (3, 3, 32, 32) and x.shape == y.shape
    for b, row in enumerate(rows):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert len(answers) == turns and answers[0] == row["answer"]
        learned = [int(t) for t in y[b] if t != -1]
        assert learned == sum((tok.encode(a) + [tok.special_id("end")] for a in answers), [])
        assert int((x[b] == tok.pad_id).sum()) == 16


def test_splice_matches_transformers_inputs_embeds(tok, tmp_path):
    """Our hooked forward == HF Llama fed embeddings that the test splices by hand (row 1 has no image)."""
    from transformers import LlamaForCausalLM

    model = micro_vlm(tok).eval()
    model.language_model.save_pretrained(str(tmp_path))
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    rows = vlm_data.make_examples(2)
    x0, _, px = vlm.collate(rows[:1], tok, model.vision_tower.config, 64)
    text = torch.tensor([tok.encode("a text-only row, as long as the first one.", bos=True)])
    T = min(x0.shape[1], text.shape[1])
    ids = torch.cat([x0[:, :T], text[:, :T]])  # (2, T): the image is in row 0 only
    with torch.no_grad():
        ours = model(ids, px)
        emb = model.language_model.model.embed_tokens(ids).clone()
        feats = model.encode_images(px)  # (1, N, C)
        slots = (ids[0] == tok.pad_id).nonzero().flatten()
        emb[0, slots] = feats[0]
        theirs = hf(inputs_embeds=emb).logits
        plain = model.language_model(ids)  # no images pending: the hook must not touch anything
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], plain[1], rtol=1e-5, atol=1e-6)  # the text-only row is the plain LM
    assert (ours[0] - plain[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="image slots"):
        model(ids, torch.cat([px, px]))  # two images, one run of slots


def test_generation_with_kv_cache_equals_recompute(tok):
    from generation import generate

    model = micro_vlm(tok, seed=1).eval()
    rows = vlm_data.make_examples(3)
    prompts = [vlm.render_with_image(tok, r["messages"][:1], 16, add_generation_prompt=True)[0] for r in rows]
    prompts[1] = prompts[1][:-3] + prompts[1][-1:]  # different lengths: left padding in the batch
    px = torch.stack([vlm_data.image_to_tensor(r["image"], 32) for r in rows])
    with model.images(px):
        cached = generate(model.language_model, prompts, 6, temperature=0.0)
        full = generate(model.language_model, prompts, 6, temperature=0.0, use_cache=False)
    assert cached == full
    answers = vlm.generate_answer(
        model, tok, [r["image"] for r in rows], [r["messages"][0]["content"] for r in rows], 6
    )
    assert answers[0] == tok.decode(cached[0]) and answers[2] == tok.decode(cached[2])


def test_save_and_load(tok, tmp_path):
    model = micro_vlm(tok, seed=2).eval()
    rows = vlm_data.make_examples(2)
    x, _, px = vlm.collate(rows, tok, model.vision_tower.config, 64)
    model.save_pretrained(str(tmp_path / "full"), tokenizer_dir=tok.path)
    back = vlm.VLM.from_pretrained(str(tmp_path / "full")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x, px), model(x, px), rtol=0, atol=0)
        # the checkpoint is still an ordinary LM checkpoint
        lm = Transformer.from_pretrained(str(tmp_path / "full"))
        torch.testing.assert_close(lm(x), model.language_model(x), rtol=0, atol=0)
    assert os.path.isfile(tmp_path / "full" / "tokenizer.model")
    lora.apply_lora(model.language_model, ("q_proj", "v_proj"), r=4, alpha=8)
    with torch.no_grad():
        for m in lora.lora_layers(model.language_model).values():
            m.lora_B.weight.normal_()  # a non-zero adapter
    model.save_pretrained(str(tmp_path / "adapter"), lora_base=str(tmp_path / "full"))
    assert os.path.isfile(tmp_path / "adapter" / "adapter_config.json")
    back = vlm.VLM.from_pretrained(str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x, px), model(x, px), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- data


def test_scenes_match_their_attributes():
    """Answers by construction, checked from the pixels: bright quadrants = positions/count, hue = colour."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        img, a = vlm_data.make_scene(rng, 32)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        bright = img.max(-1) > 120  # shapes are bright, the background is dark
        occupied = [
            q for q in range(4) if bright[(q // 2) * 16 : (q // 2 + 1) * 16, (q % 2) * 16 : (q % 2 + 1) * 16].sum() > 8
        ]
        assert occupied == a["quadrants"] and len(occupied) == a["count"]
        mean = img[bright].mean(0)
        nearest = min(vlm_data.COLOURS, key=lambda c: np.abs(np.array(vlm_data.COLOURS[c]) - mean).sum())
        assert nearest == a["colour"]
    test = vlm_data.make_examples(50, split="test")
    train = vlm_data.make_examples(50, split="train")
    assert not any(np.array_equal(t["image"], r["image"]) for t in test for r in train)  # held out
    pos = vlm_data.make_examples(20, families=("position",))
    assert all(r["answer"] in vlm_data.POSITIONS for r in pos)


def test_image_to_tensor():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :10] = 255  # left and right margins are cropped away by the centre crop
    img[:, 50:] = 255
    x = vlm_data.image_to_tensor(img, 20)
    assert x.shape == (3, 20, 20)
    torch.testing.assert_close(x, torch.full((3, 20, 20), -1.0))  # black -> -1
    small = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ref = torch.from_numpy(small).permute(2, 0, 1).float() / 127.5 - 1.0
    torch.testing.assert_close(vlm_data.image_to_tensor(small, 8), ref)  # same size: only normalized


def test_llava_json_round_trip_and_errors(tmp_path):
    cfg = vlm_data.VLMDataConfig(out_dir=str(tmp_path / "d"), n_caption=3, n_train=4, n_test=2)
    vlm_data.main(cfg)
    rows = vlm_data.load_llava_json(str(tmp_path / "d" / "train.json"))
    again = vlm_data.make_examples(4, "qa", "train", 0, 32)
    assert [r["messages"] for r in rows] == [r["messages"] for r in again]
    assert np.array_equal(vlm_data.load_image(rows[0]["image"]), again[0]["image"])  # PNG is lossless
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "human", "value": "<image>x"}]}]))
    with pytest.raises(UserError, match="row 0"):
        vlm_data.load_llava_json(str(bad))


def test_hub_rows_from_a_datasets_image_dataset():
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images = [Image.fromarray(np.full((40, 30, 3), 200, np.uint8)), Image.fromarray(np.zeros((10, 10, 3), np.uint8))]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["a grey square", "a black square"]})
    ds = ds.cast_column("image", datasets.Image())
    rows = vlm_data.HubRows(ds, text_column="text")
    assert len(rows) == 2 and rows[1]["answer"] == "a black square"
    assert vlm_data.image_to_tensor(rows[0]["image"], 16).shape == (3, 16, 16)
    with pytest.raises(UserError, match="no column"):
        vlm_data.HubRows(ds, text_column="caption")


def test_example_stream_resumes_exactly():
    a = vlm_data.ExampleStream(10, 3, seed=1)
    seen = [a.next_indices() for _ in range(4)]  # crosses an epoch boundary
    b = vlm_data.ExampleStream(10, 3, seed=1)
    b.load_state_dict(json.loads(json.dumps(vlm_data.ExampleStream(10, 3, seed=1).state_dict())))
    [b.next_indices() for _ in range(2)]
    c = vlm_data.ExampleStream(10, 3, seed=1)
    c.load_state_dict(b.state_dict())
    assert [c.next_indices() for _ in range(2)] == seen[2:]


# ----------------------------------------------------------------------------- training


def train_args(tiny_data_dir, out_dir, **kw):
    args = dict(out_dir=out_dir, tokenizer_dir=tiny_data_dir, lm_model=MICRO_MODEL, stage1_steps=8, stage1_lr=1e-3,
                steps=8, lr=1e-3, min_lr=1e-4, warmup_steps=4, batch_size=16, micro_batch_size=16, seq_len=48,
                n_caption=256, n_train=512, n_test=64, families="[colour]", eval_every=0, log_every=1,
                save_every=100, progress="false", device="cpu", seed=0, **{f"vision.{k}": v for k, v in VISION.items()})  # fmt: skip
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def run(argv):
    train_vlm.main(parse_args(train_vlm.VLMTrainConfig, argv))


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


@pytest.fixture(scope="module")
def base_lm(tiny_data_dir, tmp_path_factory):
    """A micro LM checkpoint on disk: stage 1 must hand it on bit for bit."""
    path = str(tmp_path_factory.mktemp("lm"))
    torch.manual_seed(0)
    Transformer(ModelConfig(**load_yaml(MICRO_MODEL))).save_pretrained(path, tokenizer_dir=tiny_data_dir)
    return path


def test_two_stages_keep_lm_in_stage1_and_lift_vqa(tiny_data_dir, base_lm, tmp_path, tok):
    out = str(tmp_path / "vlm")
    run(train_args(tiny_data_dir, out, lm=base_lm, steps=120))
    before, after = load_file(os.path.join(base_lm, "model.safetensors")), load_file(f"{out}/stage1/model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    vision0 = micro_vlm(tok)  # the seed-0 fresh tower train_vlm starts from: stage 1 must have moved it
    vision1 = load_file(f"{out}/stage1/vision.safetensors")
    assert not torch.equal(vision1["projector.linear_1.weight"], vision0.projector.linear_1.weight)
    # stage 2: held-out colour questions, chance 1/4
    acc = [r["vqa_acc"] for r in log_rows(out) if "vqa_acc" in r][-1]
    assert acc > 0.6, acc
    final = vlm.VLM.from_pretrained(out)  # the exported final model scores the same
    rows = vlm_data.make_examples(64, "qa", "test", 0, 32, ("colour",))
    assert vlm.vqa_accuracy(final, Tokenizer(out), rows)["accuracy"] == pytest.approx(acc)
    report = vlm.evaluate_checkpoint(out, n=8)  # eval.py's one call: all families, plus captions
    assert report["vqa_n"] == 8 and 0 <= report["vqa_acc"] <= 1 and 0 <= report["caption_acc"] <= 1

    # The user-facing hooks: sample.py image=PATH answers like generate_answer; eval.py vqa= reports VQA.
    import eval as eval_script
    import sample
    from config import parse_args

    data_dir = str(tmp_path / "vlm_data")
    vlm_data.main(parse_args(vlm_data.VLMDataConfig, [f"out_dir={data_dir}", "n_caption=1", "n_train=1", "n_test=2"]))
    image = os.path.join(data_dir, "images", "test_00000.png")
    question = "What colour is the shape?"
    got = sample.main(parse_args(sample.SampleConfig, [f"checkpoint={out}", f"image={image}", f"prompt={question}",
                                                       "temperature=0", "max_new_tokens=8"]))  # fmt: skip
    assert got == vlm.generate_answer(final, Tokenizer(out), [image], [question], 8)
    cfg = parse_args(
        eval_script.EvalConfig, [f"checkpoint={out}", "data=", "tasks=", "choices=", "vqa=builtin", "limit=8"]
    )
    assert eval_script.evaluate(out, cfg)["vqa_n"] == 8


def test_stage0_teaches_the_tower_to_see_and_is_reused(tiny_data_dir, tmp_path):
    """Stage 0 on fresh scenes: linear probes on the tower read colour and the occupied quadrants of held-out scenes
    far above chance (1/4; all four quadrants right: 1/12 for the best constant guess). A second call with the same
    settings reads the saved tower instead of training; other settings train again."""
    out = str(tmp_path / "vlm")
    cfg = parse_args(train_vlm.VLMTrainConfig, train_args(tiny_data_dir, out, stage0_steps=80, stage0_batch_size=32))
    torch.manual_seed(0)
    tower = vlm.VisionEncoder(vlm.VisionConfig(**VISION))
    start = {k: v.clone() for k, v in tower.state_dict().items()}
    train_vlm.pretrained_tower(tower, cfg, "cpu")
    path = os.path.join(out, "stage0", "vision_tower.safetensors")
    with safe_open(path, "pt") as fh:
        acc = json.loads(fh.metadata()["probe_accuracy"])
    assert acc["colour"] > 0.9 and acc["quadrants"] > 0.6, acc
    saved = load_file(path)
    assert all(torch.equal(saved[k], v) for k, v in tower.state_dict().items())
    assert not all(torch.equal(start[k], v) for k, v in tower.state_dict().items())

    again = vlm.VisionEncoder(vlm.VisionConfig(**VISION))
    train_vlm.pretrained_tower(again, cfg, "cpu")  # read, not trained: equal to the first tower bit for bit
    assert all(torch.equal(saved[k], v) for k, v in again.state_dict().items())
    cfg.stage0_steps = 2
    train_vlm.pretrained_tower(again, cfg, "cpu")
    assert not torch.equal(load_file(path)["patch_embedding.weight"], saved["patch_embedding.weight"])


def test_resume_equals_uninterrupted_and_lora(tiny_data_dir, base_lm, tmp_path):
    common = dict(lm=base_lm, stage="2", steps=6, save_every=3)
    run(train_args(tiny_data_dir, str(tmp_path / "a"), **common))
    run(train_args(tiny_data_dir, str(tmp_path / "b"), stop_after_steps=3, **common))
    assert not os.path.isfile(tmp_path / "b" / "vision.safetensors")  # stopped: nothing exported yet
    run(train_args(tiny_data_dir, str(tmp_path / "b"), **common))
    for name in ("model.safetensors", "vision.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    run(train_args(tiny_data_dir, str(tmp_path / "c"), train_lm="lora", **common))
    assert os.path.isfile(tmp_path / "c" / "adapter_config.json")
    assert not os.path.isfile(tmp_path / "c" / "model.safetensors")  # LoRA: the LM itself is the base
    vlm.VLM.from_pretrained(str(tmp_path / "c"))


def test_accumulation_equals_one_big_batch(tiny_data_dir, base_lm, tmp_path):
    """2 micro-batches of 8 == one batch of 16: the loss is divided by the step's answer tokens, not averaged per
    micro-batch, so answers of different lengths weigh the same either way (fp32, summation-order noise only)."""
    common = dict(lm=base_lm, stage="2", steps=3, warmup_steps=1, families="[colour,shape,count]")
    run(train_args(tiny_data_dir, str(tmp_path / "big"), micro_batch_size=16, **common))
    run(train_args(tiny_data_dir, str(tmp_path / "acc"), micro_batch_size=8, **common))
    for name in ("model.safetensors", "vision.safetensors"):
        a, b = load_file(str(tmp_path / "big" / name)), load_file(str(tmp_path / "acc" / name))
        for k in a:  # Adam's 1/sqrt(v) amplifies summation-order noise in near-zero gradients: atol 1e-5
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k, n=name: f"{n} {k}: {m}")
    la = [r["loss"] for r in log_rows(str(tmp_path / "big")) if "loss" in r]
    lb = [r["loss"] for r in log_rows(str(tmp_path / "acc")) if "loss" in r]
    assert len(la) == 3 and all(abs(x - y) < 1e-5 for x, y in zip(la, lb, strict=True))


def test_both_stages_under_torchrun(tiny_data_dir, base_lm, tmp_path):
    """stage=both in one torchrun launch: stage 1 keeps the process group for stage 2 (2 gloo ranks, ddp)."""
    out = str(tmp_path / "ddp")
    argv = train_args(tiny_data_dir, out, lm=base_lm, stage1_steps=2, steps=2, warmup_steps=1, batch_size=8, micro_batch_size=4,
                      n_caption=32, n_train=32, n_test=8, parallel="ddp", stage0_steps=2, stage0_batch_size=4)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_vlm.py"), *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "stage1", "DONE")) and os.path.isfile(os.path.join(out, "DONE"))
    assert [r["step"] for r in log_rows(out) if "loss" in r] == [1, 2]
    assert proc.stdout.count("stage 0: vision tower pretrained, 2 steps") == 1  # printed once: by rank 0


def test_config_errors(tiny_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="stage0_steps must be >= 0"):
        parse_args(train_vlm.VLMTrainConfig, train_args(tiny_data_dir, str(tmp_path), stage0_steps=-1))
    with pytest.raises(ConfigError, match="train_lm"):
        parse_args(train_vlm.VLMTrainConfig, train_args(tiny_data_dir, str(tmp_path), train_lm="half"))
    with pytest.raises(ConfigError, match="vision.image_size"):
        parse_args(train_vlm.VLMTrainConfig, train_args(tiny_data_dir, str(tmp_path), **{"vision.image_size": 30}))
    with pytest.raises(UserError, match="no file or folder"):
        run(train_args(tiny_data_dir, str(tmp_path / "x"), stage="2", qa_data=str(tmp_path / "missing.json")))
