"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), served beside gRPC in the same process and event loop, over
the same Engine, bearer tokens, TLS and limits. A *model* is a namespace: `GET /v1/models` lists those the token
may read, and a completion answers from that namespace's memory.

- `POST /v1/chat/completions`: the question is the last user message (earlier turns and system messages are not
  read: each answer comes from memory, not from the conversation). `POST /v1/completions`: the prompt.
- `max_tokens` (or `max_completion_tokens`) = max_new_tokens; decoding is greedy, so temperature, top_p, seed and
  the like are accepted and have no effect; `n` must be 1. `stream: true` sends server-sent events;
  `stream_options.include_usage` adds the usage chunk.
- Extensions (the openai client's `extra_body`): `top_k`, `mode` ("memory" or "rag"). Every reply carries
  `engram`: the chunks the decoder read (ids, scores) and the stage timings — in a stream, on its last chunk.
- Errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 a wrong request, 401 no or an
  unknown token, 403 a namespace the token may not read, 404 a namespace with no documents, 429 the ask queue is
  full, 503 a shard down (retry), 500 a bug (an incident id; the server log has the details).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from .ask import AskResult
from .auth import Auth
from .config import EngramConfig
from .documents_api import documents_router
from .engine import Engine
from .http_errors import ApiError, api_error
from .metrics import Metrics
from .validate import ask_options, check_mode, check_name, check_question

log = logging.getLogger("engram")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class Completion(BaseModel):
    """What both endpoints read; other OpenAI fields are accepted and ignored (greedy decoding)."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    top_k: int = 0  # extension: chunks to attend to (0 = the server's ask.top_k)
    mode: str = ""  # extension: "memory" (default) or "rag"


class ChatCompletion(Completion):
    messages: list[Message]


class TextCompletion(Completion):
    prompt: str | list[str]


def question_of(req: ChatCompletion | TextCompletion) -> str:
    if isinstance(req, TextCompletion):
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            raise ApiError(400, "invalid_request_error", "prompt must be one string", "prompt")
        return req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "invalid_request_error", "messages must include a user message (the question)", "messages")
    content = users[-1].content
    if isinstance(content, list):  # content parts: text only
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, "invalid_request_error", "only text content parts are supported", "messages")
        content = "\n".join(p["text"] for p in content)
    return content or ""


def engram_extension(out: AskResult) -> dict:
    return {
        "chunks": [
            {"chunk_id": f"{h.document_id}#{h.seq}", "document_id": h.document_id, "score": h.score, "shard": h.shard}
            for h in out.hits
        ],
        "timings": out.timings,
        "context_tokens": out.context_tokens,
    }


def usage(out: AskResult) -> dict:
    prompt = out.context_tokens + out.prompt_tokens  # what the decoder attended to: memory, then the question
    return {"prompt_tokens": prompt, "completion_tokens": out.new_tokens, "total_tokens": prompt + out.new_tokens}


def make_app(engine: Engine, cfg: EngramConfig, auth: Auth, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="Engram", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{where}: {first.get('msg', 'invalid')}" if where else "the request body must be a JSON object"
        return JSONResponse(ApiError(400, "invalid_request_error", msg, where or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, kind, str(exc.detail)).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def _limits(request: Request, call_next):
        """Body size as gRPC's message limit; every request counted and timed under its route's template (never
        a namespace or document name: clients choose those)."""
        t0 = time.perf_counter()
        if int(request.headers.get("content-length") or 0) > cfg.server.max_message_bytes:
            response = JSONResponse(
                ApiError(413, "invalid_request_error", "the request body is over server.max_message_bytes").body(),
                status_code=413,
            )
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # what no handler took: never a traceback to the client
                err = api_error(exc)
                response = JSONResponse(err.body(), status_code=err.status)
        route = getattr(request.scope.get("route"), "path", None)
        method = f"{request.method} {route}" if route else "HTTP other"
        metrics.requests.labels(method=method, code=str(response.status_code)).inc()
        metrics.latency.labels(method=method).observe(time.perf_counter() - t0)
        return response

    def token(request: Request) -> str:
        return request.headers.get("authorization", "")

    async def models(request: Request) -> list[str]:
        try:
            allowed = auth.namespaces(token(request), "the HTTP header")
            present = await engine.namespaces()
        except Exception as exc:
            raise api_error(exc) from None
        return auth.readable(allowed, present)

    def model_object(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "engram"}

    @app.get("/v1/models")
    async def list_models(request: Request):
        return {"object": "list", "data": [model_object(n) for n in await models(request)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        if name not in await models(request):
            raise ApiError(404, "not_found_error", f"no model {name!r}: GET /v1/models lists the namespaces", "model")
        return model_object(name)

    async def complete(request: Request, req: ChatCompletion | TextCompletion, chat: bool):
        try:
            check_name("model", req.model)
            auth.check_header(token(request), req.model, "the HTTP header")
            question = question_of(req)
            check_question(cfg, question)
            if req.n != 1:
                raise ApiError(400, "invalid_request_error", "n must be 1 (one greedy answer)", "n")
            names = ("top_k", "max_tokens")
            top_k, max_new = ask_options(cfg, req.top_k, req.max_completion_tokens or req.max_tokens or 0, names)
            args = (req.model, question, top_k, max_new, check_mode(req.mode))
            if not req.stream:
                out = await engine.ask(*args)
                return reply(req, chat, out, max_new)
            stream = engine.ask_stream(*args)
            await anext(stream)  # retrieval done: its errors still get their own status
        except Exception as exc:
            raise api_error(exc) from None
        return StreamingResponse(events(req, chat, stream, max_new), media_type="text/event-stream")

    def finish_reason(out: AskResult, max_new: int) -> str:
        return "length" if out.new_tokens >= max_new else "stop"

    def reply(req, chat: bool, out: AskResult, max_new: int) -> dict:
        reason = finish_reason(out, max_new)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.answer}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": out.answer, "logprobs": None, "finish_reason": reason}
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [choice],
            "usage": usage(out),
            "engram": engram_extension(out),
        }

    async def events(req, chat: bool, stream: AsyncIterator, max_new: int) -> AsyncIterator[str]:
        base = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.model,
        }

        def event(choices: list, **extra) -> str:
            return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

        def piece(text: str | None = None, reason: str | None = None, role: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "finish_reason": reason}

        try:
            if chat:
                yield event([piece(role=True)])
            async for part in stream:
                if isinstance(part, str):
                    yield event([piece(part)])
                elif isinstance(part, AskResult):
                    yield event([piece(reason=finish_reason(part, max_new))], engram=engram_extension(part))
                    if (req.stream_options or {}).get("include_usage"):
                        yield event([], usage=usage(part))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # mid-stream: the status line is sent; an error event ends the stream
            yield f"data: {json.dumps(api_error(exc).body())}\n\n"
        finally:
            await stream.aclose()  # the client went away: the decoder stops

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletion, request: Request):
        return await complete(request, req, chat=True)

    @app.post("/v1/completions")
    async def completions(req: TextCompletion, request: Request):
        return await complete(request, req, chat=False)

    app.include_router(documents_router(engine, auth))

    return app


class HttpServer(uvicorn.Server):
    """uvicorn in the serving process's event loop. Signals stay with the process (`engram serve` stops both
    servers on Ctrl-C); the socket is bound before start, so port 0 gives a known free port."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def start(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.sock = socket.create_server((host, port), family=family)
        except OSError as e:
            raise ValueError(
                f"the HTTP API cannot listen on {host}:{port} ({e.strerror}): set server.http_port (engram serve "
                "--http-port) to a free port, 0 for any, or -1 to turn the HTTP API off"
            ) from None
        self.task = asyncio.ensure_future(self.serve(sockets=[self.sock]))
        while not self.started:
            if self.task.done():
                self.task.result()  # raises why it could not start
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.sock.getsockname()[1]

    async def stop(self) -> None:
        self.should_exit = True
        await asyncio.wait_for(self.task, 30)


async def start_http(engine: Engine, cfg: EngramConfig, auth: Auth, metrics: Metrics, port: int) -> tuple:
    """-> (the running HttpServer, its bound port)."""
    s = cfg.server
    config = uvicorn.Config(
        make_app(engine, cfg, auth, metrics),
        ssl_certfile=s.tls_cert_file,
        ssl_keyfile=s.tls_key_file,
        limit_concurrency=s.max_concurrent_rpcs or None,  # past it: 503 at once, as gRPC's RESOURCE_EXHAUSTED
        lifespan="off",
        access_log=False,  # paths only, but the log stays as quiet as gRPC's
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = HttpServer(config)
    bound = await server.start(s.host, port)
    return server, bound
