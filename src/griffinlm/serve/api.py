"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events ending in
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text). Errors use
OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (the
field named in `param`), 429 with Retry-After when the queue is full, 500 when generation
failed (the engine goes on serving the others).

Prompts: a string is encoded after the tokenizer's BOS (as every training document starts);
a list of token ids is used as is; a list of strings is a batch of prompts. Chat messages are
rendered with the tokenizer's chat template where its tokenizer_config.json has one, else with
the plain template (`inference.chat`).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..inference.chat import ChatFormat
from .engine import BadRequest, Engine, Event, QueueFull, Sampling
from .metrics import ServeMetrics

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class SamplingFields(BaseModel):
    """The generation fields both endpoints share (OpenAI names; `top_k` an extension)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False


class CompletionBody(SamplingFields):
    prompt: str | list[int] | list[str]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    ignore_eos: bool = False  # an extension (as vLLM's): generate past EOS up to max_tokens


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status,
                        headers=headers)


def create_app(engine: Engine, model_name: str, metrics: ServeMetrics | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `model_name`."""
    app = FastAPI(title="griffinlm", docs_url=None, redoc_url=None)
    metrics = metrics or engine.metrics or ServeMetrics()
    tok = engine.tok
    chat_format = ChatFormat.for_tokenizer(tok)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param)

    @app.exception_handler(BadRequest)
    async def bad_request(_, exc: BadRequest):
        return error(400, str(exc), exc.param)

    @app.exception_handler(QueueFull)
    async def queue_full(_, exc: QueueFull):
        return error(429, str(exc), kind="rate_limit_error", headers={"Retry-After": "1"})

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        if request.url.path in GENERATION_PATHS:
            metrics.requests.labels(str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "active_slots": engine.active(), "queued": len(engine.queue)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "griffinlm"}]}

    def encode(prompt: str) -> list[int]:
        return [tok.bos_id] + [int(i) for i in tok.encode(prompt)]

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise BadRequest(f"model {name!r} is not served here; this server serves {model_name!r}", "model")

    async def run(request: Request, prompts: list[list[int]], sampling: Sampling, n: int, stream: bool, chat: bool):
        """Submits len(prompts) x n generations and answers with their choices."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for i, prompt in enumerate(p for p in prompts for _ in range(n)):
                s = Sampling(**{**sampling.__dict__, "stop": list(sampling.stop),
                                "seed": None if sampling.seed is None else sampling.seed + i % n})
                # the n copies of a prompt prefill it once (the first leads)
                reqs.append(engine.submit(prompt, s, lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait,
                                                                                          (i, ev)),
                                          copy_of=reqs[i - i % n] if i % n else None))
        except (QueueFull, BadRequest):
            for r in reqs:
                engine.cancel(r)
            raise
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if stream:
            return StreamingResponse(sse(request, events, reqs, cid, created, kind, chat, sampling),
                                     media_type="text/event-stream")
        texts = [""] * len(reqs)
        logprobs = [{"tokens": [], "token_logprobs": [], "top_logprobs": []} for _ in reqs]
        finish: list[str | None] = [None] * len(reqs)
        usage = [0, 0]
        try:
            while any(f is None for f in finish):
                try:
                    i, ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if ev.kind == "error":
                    return error(500, ev.message, kind="server_error")
                if ev.kind == "token":
                    texts[i] += ev.text
                    if ev.logprob is not None:
                        lp = logprobs[i]
                        lp["tokens"].append(tok.decode([ev.token]))
                        lp["token_logprobs"].append(ev.logprob)
                        lp["top_logprobs"].append({tok.decode([t]): v for t, v in (ev.top_logprobs or {}).items()})
                else:
                    finish[i] = ev.finish_reason
                    usage[0] += ev.prompt_tokens if i % n == 0 else 0
                    usage[1] += ev.completion_tokens
        finally:
            for r in reqs:
                engine.cancel(r)  # no-op for finished ones; frees the slots of an abandoned request
        choices = []
        for i, text in enumerate(texts):
            c = {"index": i, "finish_reason": finish[i]}
            if chat:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
                c["logprobs"] = logprobs[i] if sampling.logprobs is not None else None
            choices.append(c)
        return {"id": cid, "object": kind, "created": created, "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                          "total_tokens": usage[0] + usage[1]}}

    async def sse(request: Request, events: asyncio.Queue, reqs, cid: str, created: int, kind: str, chat: bool,
                  sampling: Sampling):
        left = len(reqs)
        obj = kind + ".chunk" if chat else kind
        try:
            if chat:
                for i in range(len(reqs)):
                    yield _data({"id": cid, "object": obj, "created": created, "model": model_name,
                                 "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
            while left:
                i, ev = await events.get()
                if ev.kind == "error":
                    yield _data({"error": {"message": ev.message, "type": "server_error", "param": None,
                                           "code": None}})
                    break
                if ev.kind == "token" and not ev.text:
                    continue  # held back (a partial character or a possible stop string)
                done = ev.kind == "done"
                left -= done
                choice = {"index": i, "finish_reason": ev.finish_reason if done else None}
                if chat:
                    choice["delta"] = {} if done else {"content": ev.text}
                else:
                    choice["text"] = "" if done else ev.text
                    if sampling.logprobs is not None and not done:
                        choice["logprobs"] = {"tokens": [tok.decode([ev.token])], "token_logprobs": [ev.logprob]}
                yield _data({"id": cid, "object": obj, "created": created, "model": model_name, "choices": [choice]})
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: its slots are freed at once
            for r in reqs:
                engine.cancel(r)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_model(body.model)
        if isinstance(body.prompt, str):
            prompts = [encode(body.prompt)]
        elif body.prompt and all(isinstance(p, str) for p in body.prompt):
            prompts = [encode(p) for p in body.prompt]
        else:
            prompts = [list(body.prompt)]
        sampling = Sampling(body.max_tokens, body.temperature, body.top_p, body.top_k, body.seed,
                            [body.stop] if isinstance(body.stop, str) else list(body.stop or []), body.logprobs,
                            body.ignore_eos)
        return await run(request, prompts, sampling, body.n, body.stream, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        check_model(body.model)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or chat_format.default_stop)
        sampling = Sampling(body.max_completion_tokens or body.max_tokens or 256, body.temperature, body.top_p,
                            body.top_k, body.seed, stop)
        try:
            prompt = chat_format.encode([m.model_dump() for m in body.messages])
        except Exception as e:  # the template refused the conversation (raise_exception) or failed
            raise BadRequest(f"the chat template cannot render these messages: {e}", "messages") from None
        return await run(request, [prompt], sampling, body.n, body.stream, chat=True)

    return app


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


__all__ = ["create_app", "Event"]
