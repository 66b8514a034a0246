"""sample.py: KV-cache generation against plain recomputation, sampling filters, stop strings, loading, chat.

References are independent of generation.generate: a hand-written argmax loop over full forwards, brute-force
nucleus sets, hand-computed penalties, and transformers/LoRA-in-memory logits for the loaders.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_sample.py
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import MICRO_MODEL, ROOT

import generation
import sample
from config import UserError, run_cli
from model import ModelConfig, Transformer
from tokenizer import Tokenizer


def micro_model(seed=0, **overrides):
    torch.manual_seed(seed)
    import yaml

    with open(MICRO_MODEL) as f:
        values = yaml.safe_load(f)
    values.update(overrides)
    return Transformer(ModelConfig(**values)).eval()


@pytest.fixture(scope="module")
def model():
    return micro_model()


@pytest.fixture(scope="module")
def ckpt(tiny_data_dir, tmp_path_factory):
    """A random micro model saved with the tiny tokenizer: a checkpoint dir as training writes it."""
    path = str(tmp_path_factory.mktemp("ckpt") / "micro")
    micro_model().save_pretrained(path, tokenizer_dir=tiny_data_dir)
    return path


@torch.no_grad()
def argmax_reference(model, prompt, n):
    """Greedy decoding the slow, obvious way: re-run the whole sequence, take the argmax, no cache, no batch."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


# ----------------------------------------------------------------------------- decoding


def test_greedy_is_deterministic_and_equals_argmax_without_cache(model):
    prompt = [1, 17, 230, 5, 99]
    ref = argmax_reference(model, prompt, 24)
    first = generation.generate(model, [prompt], 24, temperature=0.0)[0]
    second = generation.generate(model, [prompt], 24, temperature=0.0)[0]
    no_cache = generation.generate(model, [prompt], 24, temperature=0.0, use_cache=False)[0]
    assert first == second == ref
    assert no_cache == ref


def test_batched_left_padded_equals_one_prompt_at_a_time(model):
    prompts = [[1, 40], [1, 7, 300, 12, 9, 81, 4], [1, 500, 3, 3, 3, 3, 3, 3, 3, 3, 3, 64]]
    batch = generation.generate(model, prompts, 12, temperature=0.0)
    batch_no_cache = generation.generate(model, prompts, 12, temperature=0.0, use_cache=False)
    alone = [argmax_reference(model, p, 12) for p in prompts]
    assert batch == alone
    assert batch_no_cache == alone
    # Logits too, not only argmaxes: the padded prefill + cached decode step equals each row alone.
    cache = model.make_kv_cache(3, 16)
    idx = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for r, p in enumerate(prompts):
        idx[r, 12 - len(p) :], mask[r, 12 - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        model(idx, kv_cache=cache, start_pos=0, attention_mask=mask)
        step = model(torch.tensor([[5], [6], [7]]), kv_cache=cache, start_pos=12)[:, -1]  # (B, V)
        for r, p in enumerate(prompts):
            want = model(torch.tensor([p + [5 + r]]))[0, -1]
            torch.testing.assert_close(step[r], want, rtol=1e-5, atol=1e-5)


def test_top_k_one_equals_greedy(model):
    prompts = [[1, 2, 3, 4], [1, 99]]
    gen = torch.Generator().manual_seed(0)
    topk1 = generation.generate(model, prompts, 16, temperature=1.3, top_k=1, generator=gen)
    assert topk1 == [argmax_reference(model, p, 16) for p in prompts]


def test_seed_makes_sampling_reproducible(model):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generation.generate(model, [[1, 2, 3]], 16, temperature=1.0, top_p=0.9, generator=gen)

    assert run(5) == run(5)
    assert run(5) != run(6)  # 16 draws from a near-uniform 512-way distribution: a collision is ~impossible


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.0625])  # hand-made; sorted: .5 .25 .125 .0625 .0625
    logits = probs.log()[None]  # (1, V)
    for p in (0.3, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0):
        # brute force: the first k (in descending probability) whose total reaches p
        order = sorted(range(5), key=lambda i: -probs[i])
        k = next(k for k in range(1, 6) if sum(probs[i] for i in order[:k]) >= p - 1e-9)
        want = set(order[:k])
        kept = set(torch.isfinite(generation.filter_top_p(logits, p))[0].nonzero().flatten().tolist())
        assert kept == want, (p, kept, want)
    assert set(torch.isfinite(generation.filter_top_k(logits, 2))[0].nonzero().flatten().tolist()) == {1, 3}


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = generation.apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]), rtol=0, atol=0)


def test_stop_ids_end_a_row_early_and_are_not_returned(model):
    prompt = [1, 17, 230]
    ref = argmax_reference(model, prompt, 10)
    out = generation.generate(model, [prompt, [1, 4]], 10, temperature=0.0, stop_ids=(ref[3],))
    assert out[0] == ref[: ref.index(ref[3])]


# ----------------------------------------------------------------------------- stop strings and streaming


def test_cut_at_stop_takes_the_earliest_stop():
    assert generation.cut_at_stop("abc\n\ndef###", ["###", "\n\n"]) == ("abc", True)
    assert generation.cut_at_stop("abc", ["x"]) == ("abc", False)
    assert generation.cut_at_stop("abc", []) == ("abc", False)


def test_stop_string_cuts_generation_at_the_right_place(model, tiny_data_dir):
    tok = Tokenizer(tiny_data_dir)
    prompt = tok.encode("The cat", bos=True)
    ids = argmax_reference(model, prompt, 30)
    text = generation.continuation(tok.decode, prompt, ids)
    stop = text[6:9]  # some three characters from the middle of the greedy continuation
    assert len(stop) == 3 and stop.strip()
    out = generation.generate(model, [prompt], 30, temperature=0.0, stop_strings=(stop,), decode=tok.decode)[0]
    assert out == ids[: len(out)]  # the same greedy path, ended early
    assert stop in generation.continuation(tok.decode, prompt, out)  # stopped once the string is complete ...
    assert stop not in generation.continuation(tok.decode, prompt, out[:-1])  # ... and not one token later
    cut, found = generation.cut_at_stop(generation.continuation(tok.decode, prompt, out), [stop])
    assert found and cut == text[: text.index(stop)]


def test_stream_holds_back_a_possible_stop_string():
    decode = lambda ids: "".join(chr(i) for i in ids)  # one character per id
    stream = generation.TextStream(decode, [ord(">")], ["\n\n", "END"])
    shown = []
    for ch in "ab\nc\nEN!E\n\nnever shown":
        shown.append(stream.feed(ord(ch)))
        assert "".join(shown) == "ab\nc\nEN!E"[: len("".join(shown))]  # never text past the stop
    assert shown[2] == ""  # "ab\n": the newline may start "\n\n", so it waits
    assert shown[3] == "\nc"  # "c" proves it was not a stop string
    assert shown[6] == ""  # "EN" may start "END"
    assert stream.stopped
    assert "".join(shown) + stream.finish() == "ab\nc\nEN!E"


def test_stream_holds_back_half_a_character():
    pieces = {1: "a", 2: "\ufffd", 3: "é"}  # byte fallback: a lone first byte decodes to U+FFFD
    decode = lambda ids: "".join(pieces[i] for i in ids).replace("\ufffdé", "é")
    stream = generation.TextStream(decode, [], [])
    assert stream.feed(1) == "a"
    assert stream.feed(2) == ""
    assert stream.feed(3) == "é"


def test_parse_stop_reads_escapes():
    assert sample.parse_stop("\\n\\n") == "\n\n"
    assert sample.parse_stop('"###"') == "###"
    assert sample.parse_stop("END") == "END"


# ----------------------------------------------------------------------------- loading checkpoints


def test_lora_adapter_dir_loads_on_its_base(ckpt, tmp_path):
    import lora

    base = Transformer.from_pretrained(ckpt)
    lora.apply_lora(base, r=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora.lora_parameters(base):
            p.normal_(0, 0.05)  # B starts at zero: make the adapter change the output
    adapter = str(tmp_path / "adapter")
    lora.save_adapter(base, adapter, base_model_name_or_path=ckpt)
    loaded, tok = generation.load_for_inference(adapter, device="cpu")
    assert tok.vocab_size == 512  # the tokenizer came from the base dir
    idx = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), base.eval()(idx), rtol=1e-4, atol=1e-5)


def test_hf_written_llama_dir_loads(ckpt, tmp_path, tiny_data_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    hf_dir = str(tmp_path / "hf")
    hf.save_pretrained(hf_dir)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        with open(os.path.join(tiny_data_dir, name), "rb") as src, open(os.path.join(hf_dir, name), "wb") as dst:
            dst.write(src.read())
    loaded, _ = generation.load_for_inference(hf_dir, device="cpu")
    idx = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), hf(idx).logits, rtol=1e-4, atol=1e-5)


def test_hf_tokenizer_checkpoint_samples_and_chats_through_transformers(tmp_path):
    """A checkpoint whose tokenizer is a transformers tokenizer.json (no tokenizer.model of ours) goes through
    HFTokenizer: ids equal AutoTokenizer's, chat renders with the checkpoint's own template, EOS stops."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    raw = RawTokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    raw.train_from_iterator(["the cat sees the red ball", "a dog runs to the big red ball"], trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    hf_tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}" \
                           "{% if add_generation_prompt %}assistant{% endif %}"  # fmt: skip
    path = str(tmp_path / "hf_tok")
    micro_model().save_pretrained(path)  # no tokenizer_dir: only transformers' files below
    hf_tok.save_pretrained(path)
    assert not os.path.exists(os.path.join(path, "tokenizer.model"))

    model, tok = generation.load_for_inference(path, device="cpu")
    assert isinstance(tok, generation.HFTokenizer) and tok.vocab_size == len(hf_tok)
    text = "the red dog sees a ball"
    assert tok.encode(text, bos=True) == [hf_tok.bos_token_id] + hf_tok(text, add_special_tokens=False).input_ids
    assert tok.decode(tok.encode(text)) == text
    messages = [{"role": "user", "content": "the cat"}]
    ids, mask = tok.render_chat(messages, add_generation_prompt=True)
    assert ids == list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert generation.stop_ids_of(tok) == (hf_tok.eos_token_id,)  # no <|end|> marker in this tokenizer

    cfg = sample.SampleConfig(checkpoint=path, prompt="the cat", temperature=0.0, max_new_tokens=5, device="cpu")
    body = sample.main(cfg)[0]
    new = generation.generate(model, [tok.encode("the cat", bos=True)], 5, temperature=0.0, stop_ids=(tok.eos_id,))[0]
    assert body == generation.continuation(tok.decode, tok.encode("the cat", bos=True), new)


def test_bad_checkpoints_are_one_line_errors(ckpt, tmp_path, capsys):
    with pytest.raises(UserError, match="no directory"):
        generation.load_for_inference(str(tmp_path / "missing"))
    small = str(tmp_path / "small")  # the tokenizer has 512 tokens, this model only 256
    micro_model(vocab_size=256).save_pretrained(small, tokenizer_dir=ckpt)
    with pytest.raises(UserError, match="vocabulary mismatch"):
        generation.load_for_inference(small)
    broken = str(tmp_path / "broken")
    micro_model().save_pretrained(broken)
    weights = os.path.join(broken, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(SystemExit) as e:
        run_cli(sample.main, sample.SampleConfig, argv=[f"checkpoint={broken}", "prompt=hi"], show_config=False)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_cli_prompt_prints_what_generate_returns(ckpt, capsys):
    cfg = sample.SampleConfig(checkpoint=ckpt, prompt="The dog", temperature=0.0, max_new_tokens=12)
    bodies = sample.main(cfg)
    out = capsys.readouterr()
    assert out.out == "The dog" + bodies[0] + "\n"
    assert "tokens/s" in out.err


def test_chat_answers_through_piped_stdin(ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [f"checkpoint={ckpt}", "chat=true", "temperature=0", "max_new_tokens=6", "device=cpu"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), *args],
        input="The cat sees\n\nthe red ball\n",  # the blank line is skipped
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("assistant> ") for line in lines), proc.stdout
    # The first answer is what greedy generation gives for the rendered one-turn chat.
    model, tok = generation.load_for_inference(ckpt, device="cpu")
    ids, _ = tok.render_chat([{"role": "user", "content": "The cat sees"}], add_generation_prompt=True)
    new = generation.generate(model, [ids], 6, temperature=0.0, stop_ids=generation.stop_ids_of(tok))[0]
    assert lines[0] == "assistant> " + generation.continuation(tok.decode, ids, new)
    assert proc.stderr.count("tokens/s") == 2
