"""serve.py: the OpenAI-compatible server, driven by the official `openai` client and by a real browser.

One server per module runs on a free 127.0.0.1 port (uvicorn in a thread, the same app main() serves). The
reference for every answer is independent of serve.py and of generation.generate's KV cache: the prompt is
rendered with tokenizer.render_chat and decoded greedily by re-running the whole sequence each step.
The browser test needs Chromium + chromedriver (`make setup-test` installs them as root on Debian) and skips
with the reason otherwise.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_serve.py
"""

import concurrent.futures
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
import yaml
from conftest import MICRO_MODEL

import serve
from config import run_cli
from generation import load_for_inference, stop_ids_of
from model import ModelConfig, Transformer

MAX_TOKENS = 16  # answer length in these tests: the micro model's context is 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server for `app` on a free local port, in a thread; stop() shuts it down cleanly."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the test server did not start"
        self.url = f"http://127.0.0.1:{self.server.config.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def ckpt(tiny_data_dir, tmp_path_factory):
    """A random micro model saved with the tiny tokenizer, as training writes a checkpoint."""
    torch.manual_seed(0)
    with open(MICRO_MODEL) as f:
        model = Transformer(ModelConfig(**yaml.safe_load(f)))
    path = str(tmp_path_factory.mktemp("serve") / "micro")
    model.save_pretrained(path, tokenizer_dir=tiny_data_dir)
    return path


@pytest.fixture(scope="module")
def reference(ckpt):
    return load_for_inference(ckpt, device="cpu")


@pytest.fixture(scope="module")
def server(ckpt):
    cfg = serve.ServeConfig(checkpoint=ckpt, device="cpu", max_messages=8, max_chars=2000, model_name="micro")
    running = Running(serve.make_app(cfg))
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="anything: auth is off", max_retries=0)


def after(tok, seq, n) -> str:
    """The text of seq[n:] as it reads after seq[:n] (decoding it alone would drop a leading space)."""
    return tok.decode(seq)[len(tok.decode(seq[:n])) :]


@torch.no_grad()
def greedy_text(reference, messages, n=MAX_TOKENS) -> tuple[str, str]:
    """(answer, finish_reason) the slow obvious way: full forward per token, argmax, stop at EOS / <|end|>."""
    model, tok = reference
    seq, _ = tok.render_chat(messages, add_generation_prompt=True)
    prompt_len, stops = len(seq), set(stop_ids_of(tok))
    for _ in range(n):
        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        if nxt in stops:
            return after(tok, seq, prompt_len), "stop"
        seq.append(nxt)
    return after(tok, seq, prompt_len), "length"


def ask(text, system="You are terse."):
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


# ----------------------------------------------------------------------------- answers


def test_chat_answer_streamed_or_not_equals_greedy_reference(client, reference):
    messages = ask("sorted([3, 1, 2]) = ?")
    want, finish = greedy_text(reference, messages)
    r = client.chat.completions.create(model="micro", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(reference[1].render_chat(messages, add_generation_prompt=True)[0])
    pieces = []
    for chunk in client.chat.completions.create(
        model="micro", messages=messages, temperature=0, max_tokens=MAX_TOKENS, stream=True
    ):
        assert chunk.object == "chat.completion.chunk"
        pieces.append(chunk.choices[0].delta.content or "")
        last = chunk.choices[0].finish_reason
    assert "".join(pieces) == want and last == finish
    assert sum(1 for p in pieces if p) > 1  # tokens arrived one by one, not as one block


def test_sse_wire_format_ends_with_done(server):
    body = {"messages": ask("hi"), "temperature": 0, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and '"role": "assistant"' in events[0]


def test_completions_models_health_and_page(client, server, reference):
    model, tok = reference
    prompt = "The cat sees"
    seq = tok.encode(prompt, bos=True)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    want = after(tok, seq, len(tok.encode(prompt, bos=True)))  # a random model may emit EOS; this one does not
    r = client.completions.create(model="micro", prompt=prompt, temperature=0, max_tokens=8)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="micro", prompt=prompt, temperature=0, max_tokens=8, stream=True))  # fmt: skip
    assert streamed == want
    assert [m.id for m in client.models.list().data] == ["micro"]
    assert httpx.get(server + "/health").json()["status"] == "ok"
    page = httpx.get(server + "/")
    assert page.status_code == 200 and 'id="system"' in page.text and "/v1/chat/completions" in page.text


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="micro", messages=ask("tell me"), temperature=1.0, top_p=0.9, max_tokens=MAX_TOKENS, seed=7)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    c = client.chat.completions.create(**(kw | {"seed": 8})).choices[0].message.content
    assert a == b and a != c  # two seeds agreeing on 16 tokens from 512 would be a near-impossible fluke


class ScriptedModel(torch.nn.Module):
    """Stands in for a model that writes `script` (token ids) then EOS, whatever the prompt: the answer's bytes
    are known, so a stream that split a character would show U+FFFD in some chunk."""

    def __init__(self, script, vocab_size, eos_id):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, max_position_embeddings=128)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate() reads the device from the parameters
        self.script, self.eos_id, self.step = list(script), eos_id, 0

    def make_kv_cache(self, batch, length):
        return None

    def forward(self, idx, kv_cache=None, start_pos=0, attention_mask=None):
        self.step = 0 if idx.shape[1] > 1 else self.step + 1  # a prefill starts a new answer
        tok = self.script[self.step] if self.step < len(self.script) else self.eos_id
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.config.vocab_size)
        logits[..., tok] = 1.0
        return logits


def test_stream_never_splits_a_multibyte_character(reference):
    tok = reference[1]
    text = "你好😀 ok 中文"
    script = tok.encode(text)  # this tokenizer has no CJK pieces: they arrive as single UTF-8 bytes (byte fallback)
    assert len(script) > len(text)
    model = ScriptedModel(script, reference[0].config.vocab_size, tok.eos_id)
    running = Running(serve.make_app(serve.ServeConfig(checkpoint="unused"), model=model, tokenizer=tok))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
        kw = dict(model="m", messages=ask("hi"), temperature=0, max_tokens=len(script) + 5)
        whole = client.chat.completions.create(**kw).choices[0].message.content
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)]
    finally:
        running.stop()
    assert whole == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and sum(1 for p in pieces if p) > 3


def test_eight_concurrent_requests_all_correct(client, reference):
    questions = [f"question {i}: {w}" for i, w in enumerate("abc ab cat dog len sum max min".split())]
    want = [greedy_text(reference, ask(q))[0] for q in questions]

    def one(i):
        kw = dict(model="micro", messages=ask(questions[i]), temperature=0, max_tokens=MAX_TOKENS)
        if i % 2:  # half stream, half do not: both kinds interleave in the queue
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
        return client.chat.completions.create(**kw).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert got == want


# ----------------------------------------------------------------------------- refusals


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url = server + "/v1/chat/completions"
    long_text = " ".join(["banana"] * 150)  # < max_chars=2000 characters, but more than 128 tokens
    cases = {  # name: (request, a word the error message must hold: each case trips its own check)
        "invalid json": (dict(content=b"{not json", headers={"content-type": "application/json"}), "JSON"),
        "no messages": (dict(json={"messages": []}), "at least one"),
        "messages missing": (dict(json={"temperature": 0}), "messages"),
        "unknown role": (dict(json={"messages": [{"role": "wizard", "content": "hi"}]}), "wizard"),
        "max_tokens beyond context": (dict(json={"messages": ask("hi"), "max_tokens": 500}), "max_tokens=500"),
        "prompt longer than context": (dict(json={"messages": ask(long_text)}), "maximum context length"),
        "too many messages": (dict(json={"messages": ask("hi") * 5}), "10 messages"),
        "too many characters": (dict(json={"messages": ask("x" * 2001)}), "characters"),
        "temperature out of range": (dict(json={"messages": ask("hi"), "temperature": 9}), "temperature"),
        "n > 1": (dict(json={"messages": ask("hi"), "n": 2}), "n=1"),
        "wrong type": (dict(json={"messages": "hi"}), "messages"),
    }
    for name, (kw, word) in cases.items():
        r = httpx.post(url, timeout=30, **kw)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert word in err["message"] and err["type"] == "invalid_request_error", (name, err)
    assert httpx.post(server + "/v1/completions", json={"prompt": "x" * 2001}).status_code == 400
    assert httpx.get(server + "/v1/nothing").status_code == 404
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="micro", messages=ask(long_text))
    r = client.chat.completions.create(model="micro", messages=ask("still there?"), temperature=0, max_tokens=4)
    assert r.choices[0].message.content is not None
    assert httpx.get(server + "/health").json()["queued"] == 0


def test_api_key_required_when_set(ckpt, reference):
    cfg = serve.ServeConfig(checkpoint=ckpt, device="cpu", api_key="sk-test-123")
    running = Running(serve.make_app(cfg, *reference))
    try:
        kw = dict(model="m", messages=ask("hi"), temperature=0, max_tokens=2)
        for key in ("wrong", "sk-test-12"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0).chat.completions.create(**kw)
        r = httpx.post(running.url + "/v1/chat/completions", json=kw)  # no header at all
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=running.url + "/v1", api_key="sk-test-123", max_retries=0)
        assert good.chat.completions.create(**kw).choices[0].message.content is not None
        assert httpx.get(running.url + "/health").status_code == 200  # the page and health stay open
    finally:
        running.stop()


def test_quantize_nf4_serves_the_4bit_model(ckpt):
    """quantize=nf4 reaches the served model: its block linears are NF4, and it answers what the same
    checkpoint loaded with quantize=nf4 outside the server answers greedily."""
    import lora

    app = serve.make_app(serve.ServeConfig(checkpoint=ckpt, device="cpu", quantize="nf4"))
    served = app.state.engine.model
    assert sum(isinstance(m, lora.NF4Linear) for m in served.modules()) == 7 * served.config.num_hidden_layers
    running = Running(app)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
        got = client.chat.completions.create(model="m", messages=ask("hi"), temperature=0, max_tokens=MAX_TOKENS)
    finally:
        running.stop()
    assert got.choices[0].message.content == greedy_text(load_for_inference(ckpt, "cpu", quantize="nf4"), ask("hi"))[0]


def test_config_mistakes_are_one_line(capsys, tmp_path):
    for args, key in ((["checkpoint=" + str(tmp_path / "none")], "checkpoint"), (["port=70000"], "port"),
                      (["quantize=int3"], "quantize"), (["max_chars=0"], "max_chars")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            run_cli(serve.main, serve.ServeConfig, argv=args, show_config=False)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and key in err and "Traceback" not in err


# ----------------------------------------------------------------------------- a real browser


def _chrome():
    """A headless Chromium driven through chromedriver (Debian: apt-get install chromium chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-test)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no Chromium + chromedriver on this machine (make setup-test installs them as root on Debian)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1000,700",
    ):
        opts.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=opts, service=Service(driver_path))


def test_chat_page_in_headless_chromium_streams_the_answer(server, reference):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome()
    try:
        driver.get(server + "/")
        for field, value in (("temperature", "0"), ("max-tokens", str(MAX_TOKENS)), ("system", "You are terse.")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "input").send_keys("sorted([3, 1, 2]) = ?")
        driver.find_element(By.ID, "send").click()
        done = WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg[data-done]"))[0]
        want, finish = greedy_text(reference, ask("sorted([3, 1, 2]) = ?"))
        assert "error" not in done.get_attribute("class"), done.get_attribute("textContent")
        assert done.get_attribute("textContent") == want and done.get_attribute("data-finish") == finish
        assert int(done.get_attribute("data-chunks")) > 1  # the page received the answer in pieces
        driver.find_element(By.ID, "clear").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        driver.quit()
