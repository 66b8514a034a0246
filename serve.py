"""Serving: an OpenAI-compatible HTTP server and a web chat page for any checkpoint sample.py loads.

    python serve.py checkpoint=out/sft                  # http://127.0.0.1:8000 : the chat page
    python serve.py checkpoint=out/dpo/merged port=8080 api_key=secret quantize=nf4
    python serve.py checkpoint=hf:TinyLlama/TinyLlama-1.1B-Chat-v1.0
    python serve.py --help

Routes (the subset of OpenAI's API that chat clients use; docs/11-serving.md shows curl and the openai client):
    POST /v1/chat/completions   messages -> our chat template (tokenizer.render_chat) -> generation.generate
    POST /v1/completions        a plain prompt continued, as sample.py prompt=... does
    GET  /v1/models             the one model served;   GET /health   liveness and queue length
    GET  /                      web/chat.html, a one-file chat page that streams the answer

Key choices:
- One worker thread owns the model. Requests queue up and run one after another, each generate() call with its
  own fresh KV cache, so concurrent clients never share or corrupt state; the web stack (FastAPI on uvicorn's
  asyncio loop) keeps accepting, validating and streaming while the worker computes. Batching requests together
  would raise tokens/s under load (vLLM's continuous batching with paged attention); that is not done here.
- Streaming is server-sent events in OpenAI's chunk format ("data: {chunk}\\n\\n" ... "data: [DONE]"). The text
  comes from generation.TextStream, which holds back half a multi-byte character and a possible stop-string
  prefix, so the joined chunks equal the non-streamed answer exactly (Chinese and emoji included).
- A bad request (invalid JSON, no messages, an unknown role, too many messages or characters, a prompt or
  max_tokens beyond the context) gets a 4xx with OpenAI's error JSON {"error": {"message", "type", "param",
  "code"}}; the server keeps serving. The `model` field of a request is accepted whatever it says.
- Binds 127.0.0.1 by default (this machine only). api_key= makes /v1/* require `Authorization: Bearer KEY`.

What this is not: a production serving stack (no batching, no paged attention, no tensor parallelism, no
multiple models). It is the shortest honest path from a checkpoint to the clients people already use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import queue
import random
import socket
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from config import UserError, format_config, run_cli
from generation import TextStream, continuation, cut_at_stop, generate, load_for_inference, stop_ids_of

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "chat.html")

# ----------------------------------------------------------------------------- the command line


@dataclasses.dataclass
class ServeConfig:
    checkpoint: str = "out/sft"  # checkpoint dir (ours, a LoRA adapter, HF Llama/Mixtral) or hf:ORG/NAME
    host: str = "127.0.0.1"  # address to bind: 127.0.0.1 = this machine only; 0.0.0.0 = every network (set api_key)
    port: int = 8000  # TCP port
    api_key: str = ""  # when set, /v1/* needs the header `Authorization: Bearer <api_key>`
    model_name: str = ""  # the model id /v1/models reports; "" = the checkpoint's folder name
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    quantize: str = ""  # nf4: block linears stored in 4 bits (lora.quantize_nf4); "" = as loaded
    max_tokens: int = 256  # answer length when a request names none (cut to what the context leaves)
    max_messages: int = 64  # a request with more messages gets 400
    max_chars: int = 32000  # a request with more characters (all message contents, or the prompt) gets 400
    max_queue: int = 64  # requests waiting for the model at once; one more gets 429 (try again later)
    log_level: str = "warning"  # uvicorn's log level: debug | info | warning | error

    def validate(self) -> list[str]:
        errors = []
        if not self.checkpoint.startswith("hf:") and not os.path.isdir(self.checkpoint):
            errors.append(f"checkpoint: no directory at '{self.checkpoint}'")
        if not 1 <= self.port <= 65535:
            errors.append("port must be in 1..65535")
        if self.quantize not in ("", "nf4"):
            errors.append(f"quantize must be '' or nf4, not '{self.quantize}'")
        if min(self.max_tokens, self.max_messages, self.max_chars, self.max_queue) <= 0:
            errors.append("max_tokens, max_messages, max_chars and max_queue must be > 0")
        if self.log_level not in ("debug", "info", "warning", "error"):
            errors.append(f"log_level must be debug, info, warning or error, not '{self.log_level}'")
        return errors


# ----------------------------------------------------------------------------- errors in OpenAI's shape


class APIError(Exception):
    """A request the server refuses: answered as {"error": {...}} with an HTTP status, never a traceback."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        body = {"message": self.message, "type": kind.get(self.status, "invalid_request_error"),
                "param": self.param, "code": self.code}  # fmt: skip
        return JSONResponse({"error": body}, status_code=self.status)


# ----------------------------------------------------------------------------- the worker that owns the model


class Cancelled(Exception):
    """Raised inside generate's token callback when the client went away: stops the work early."""


@dataclasses.dataclass
class Job:
    """One request for the worker. emit(kind, value) hands results back: ("text", piece) while generating,
    then ("done", {"text", "finish_reason", "completion_tokens"}) or ("error", message)."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int
    emit: object
    cancelled: bool = False


class Engine:
    """The model, its tokenizer and one worker thread that runs queued jobs one at a time.

    generate() allocates a new KV cache per call, and only this thread calls it: two requests can never write
    into the same cache or interleave their forwards. The HTTP side only submits jobs and reads their events.
    """

    def __init__(self, model, tokenizer, max_queue: int):
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.context = model.config.max_position_embeddings
        self.stop_ids = stop_ids_of(tokenizer)
        self.device = next(model.parameters()).device
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="engine").start()

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= self.max_queue:
            raise APIError(429, f"the server has {self.max_queue} requests waiting; try again later", code="busy")
        self.jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                self._run(job)
            except Cancelled:
                pass
            except Exception as e:  # a bug or an out-of-memory must not kill the worker: report it, serve on
                job.emit("error", f"{type(e).__name__}: {e}")

    def _run(self, job: Job) -> None:
        decode = self.tokenizer.decode
        stream = TextStream(decode, job.prompt, job.stop)

        def on_token(row: int, tok: int) -> None:
            if job.cancelled:
                raise Cancelled
            piece = stream.feed(tok)
            if piece:
                job.emit("text", piece)

        gen = torch.Generator(device=self.device).manual_seed(job.seed)
        new = generate(self.model, [job.prompt], job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                       stop_ids=self.stop_ids, stop_strings=job.stop, decode=decode, generator=gen,
                       on_token=on_token)[0]  # fmt: skip
        tail = stream.finish()
        if tail:
            job.emit("text", tail)
        text, hit_stop = cut_at_stop(continuation(decode, job.prompt, new), job.stop)
        # Fewer tokens than allowed means a stop id ended the answer; all of them without a stop string: cut off.
        finish = "stop" if hit_stop or len(new) < job.max_tokens else "length"
        job.emit("done", {"text": text, "finish_reason": finish, "completion_tokens": len(new)})


# ----------------------------------------------------------------------------- requests


class Message(BaseModel):
    role: str
    content: str | list[dict] | None = None  # a string, or OpenAI's list of {"type": "text", "text": ...} parts


class Sampling(BaseModel):
    """The fields both completion routes share (unknown fields such as frequency_penalty are ignored)."""

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class ChatRequest(Sampling):
    messages: list[Message]


class CompletionRequest(Sampling):
    prompt: str | list[str]


def _text_of(m: Message, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    if not all(isinstance(p, dict) and p.get("type") == "text" for p in m.content):
        raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
    return "".join(str(p.get("text", "")) for p in m.content)


def chat_prompt(req: ChatRequest, tokenizer, cfg: ServeConfig) -> list[int]:
    """The messages rendered by the chat template, ending with the assistant's turn marker."""
    if not req.messages:
        raise APIError(400, "messages: at least one message is required", "messages")
    if len(req.messages) > cfg.max_messages:
        raise APIError(400, f"messages: {len(req.messages)} messages, the limit is {cfg.max_messages}", "messages")
    # "developer" is OpenAI's newer name for the system role; tool and function messages are not supported.
    roles = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in roles:
            raise APIError(400, f"messages[{i}].role: unknown role '{m.role}' (system, user, assistant)",
                           f"messages[{i}].role")  # fmt: skip
        messages.append({"role": roles[m.role], "content": _text_of(m, i)})
    chars = sum(len(m["content"]) for m in messages)
    if chars > cfg.max_chars:
        raise APIError(400, f"messages: {chars} characters, the limit is {cfg.max_chars}", "messages")
    try:
        return tokenizer.render_chat(messages, add_generation_prompt=True)[0]
    except Exception as e:  # our template raises ValueError, an HF tokenizer's jinja template other types
        raise APIError(400, f"messages: {e}", "messages") from None


def make_job(req: Sampling, prompt: list[int], engine: Engine, cfg: ServeConfig, emit) -> Job:
    """Check the sampling fields and the context budget; a problem is a 400 naming the field."""
    if req.n != 1:
        raise APIError(400, "n: only n=1 is supported", "n")
    if not 0 <= req.temperature <= 2:
        raise APIError(400, "temperature must be in [0, 2]", "temperature")
    if not 0 < req.top_p <= 1:
        raise APIError(400, "top_p must be in (0, 1]", "top_p")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, "stop: at most 4 stop strings", "stop")
    room = engine.context - len(prompt)
    if room <= 0:
        raise APIError(400, f"this model's maximum context length is {engine.context} tokens; the prompt has "
                       f"{len(prompt)}", "messages", "context_length_exceeded")  # fmt: skip
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and (asked <= 0 or asked > room):
        raise APIError(400, f"max_tokens={asked}: the prompt has {len(prompt)} tokens, so at most {room} more fit "
                       f"the context of {engine.context}", "max_tokens", "context_length_exceeded")  # fmt: skip
    seed = req.seed if req.seed is not None else random.randrange(2**31)
    return Job(prompt, asked or min(cfg.max_tokens, room), req.temperature, req.top_p, tuple(s for s in stop if s),
               seed, emit)  # fmt: skip


# ----------------------------------------------------------------------------- the app


def make_app(cfg: ServeConfig, model=None, tokenizer=None) -> FastAPI:
    """The FastAPI app serving one model (loaded from cfg.checkpoint unless given: tests and benchmarks pass
    one in). Run it with uvicorn, as main() does."""
    if model is None:
        model, tokenizer = load_for_inference(cfg.checkpoint, cfg.device, cfg.dtype, cfg.quantize)
    engine = Engine(model, tokenizer, cfg.max_queue)
    name = cfg.model_name or os.path.basename(os.path.normpath(cfg.checkpoint.removeprefix("hf:")))
    with open(PAGE, encoding="utf-8") as fh:
        page = fh.read()
    app = FastAPI(title="ZeroToScratch", docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)  # invalid JSON or a field of the wrong type: 400, not 422
    async def bad_body(request, e: RequestValidationError):
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"][1:] if x != "body")
        if err["type"] == "json_invalid":
            return APIError(400, f"the body is not valid JSON ({err['msg']})", code="invalid_json").response()
        return APIError(400, f"{where or 'body'}: {err['msg']}", where or None).response()

    @app.exception_handler(HTTPException)  # unknown route (404), wrong method (405)
    async def http_error(request, e: HTTPException):
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            # compare_digest: the time taken does not reveal how many leading characters were right
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                return APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None,
                                "invalid_api_key").response()  # fmt: skip
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "queued": engine.jobs.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await answer(req, chat_prompt(req, engine.tokenizer, cfg), chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            raise APIError(400, "prompt: give one prompt (a string)", "prompt")
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        if len(prompt) > cfg.max_chars:
            raise APIError(400, f"prompt: {len(prompt)} characters, the limit is {cfg.max_chars}", "prompt")
        return await answer(req, engine.tokenizer.encode(prompt, bos=True), chat=False)

    async def answer(req: Sampling, prompt: list[int], chat: bool):
        """Queue the job; return the whole answer as JSON, or stream it as server-sent events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = make_job(req, prompt, engine, cfg, lambda *ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        engine.submit(job)
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": name}  # fmt: skip

        def usage(done: dict) -> dict:
            n = done["completion_tokens"]
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        if not req.stream:
            while (ev := await events.get())[0] == "text":
                pass
            if ev[0] == "error":
                return APIError(500, ev[1], code="server_error").response()
            done = ev[1]
            reply = {"message": {"role": "assistant", "content": done["text"]}} if chat else {"text": done["text"]}
            choice = {"index": 0, **reply, "logprobs": None, "finish_reason": done["finish_reason"]}
            obj = "chat.completion" if chat else "text_completion"
            return {**head, "object": obj, "choices": [choice], "usage": usage(done)}

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish=None, first=False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({**head, "object": obj, "choices": [choice]}, ensure_ascii=False) + "\n\n"

        async def sse():
            try:
                if chat:
                    yield chunk(None, first=True)  # OpenAI's first chunk carries the role
                while (ev := await events.get())[0] == "text":
                    yield chunk(ev[1])
                if ev[0] == "error":
                    yield "data: " + json.dumps({"error": {"message": ev[1], "type": "server_error"}}) + "\n\n"
                else:
                    yield chunk(None, finish=ev[1]["finish_reason"])
                    if (req.stream_options or {}).get("include_usage"):
                        yield (
                            "data: "
                            + json.dumps({**head, "object": obj, "choices": [], "usage": usage(ev[1])})
                            + "\n\n"
                        )
                yield "data: [DONE]\n\n"
            finally:  # the client closed the connection (or we finished): let the worker drop the job
                job.cancelled = True

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    return app


def main(cfg: ServeConfig) -> None:
    print(format_config(dataclasses.replace(cfg, api_key="***" if cfg.api_key else "")), flush=True)  # no secret
    with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as probe:  # before the slow load
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as e:
            raise UserError(f"host/port: cannot listen on {cfg.host}:{cfg.port} ({e.strerror})") from None
    # ---- model ----
    app = make_app(cfg)
    # ---- serve ----
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"serving {cfg.checkpoint} at {url}  (chat page: {url}/ , OpenAI API: {url}/v1)", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"warning: host={cfg.host} without api_key: anyone who reaches this port can use the model", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)


if __name__ == "__main__":
    run_cli(main, ServeConfig, __doc__, show_config=False)
