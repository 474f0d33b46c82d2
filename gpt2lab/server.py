"""`gpt2lab serve`: the HTTP layer. OpenAI's completions, chat and embeddings endpoints, vLLM's
tokenizer endpoints, the playground page; requests and responses declared in protocol.py.

This module knows nothing of tensors: it checks requests, tokenizes, hands jobs to the engine
(engine.py, which owns the model) and turns the engine's events (plain values) into OpenAI objects
or server-sent events. fastapi and uvicorn are imported inside functions: `import gpt2lab` stays light.

Robustness, each held by a test in tests/test_server*.py:
- every error is an OpenAI-style 4xx ({"error": {message, type, param, code}}); an unexpected
  exception is a JSON 500 that still leaves the connection open (`_CatchAll`), never a dropped one;
- bodies are read with a size limit (413) and checked before parsing (deep nesting, huge numbers);
- the stream limit is taken atomically when a stream is admitted and given back when it ends;
- a connection whose request has not arrived whole within --read-timeout-s is closed (slowloris),
  and at most --max-connections are served at once (uvicorn answers 503 beyond).
"""

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import os
import struct
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gpt2lab.config import ServeConfig
from gpt2lab.engine import EmbedJob, Engine, Event, Job, QueueFull, TokenLogprob, choice_seed
from gpt2lab.errors import UserError
from gpt2lab.sampling import Sampling

INSTALL_HINT = 'gpt2lab serve needs FastAPI and uvicorn: pip install -e ".[serve]"'
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there
MAX_JSON_DEPTH = 32  # nesting deeper than any valid request: refused before the JSON parser recurses


# --- OpenAI-style errors ------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _unsupported(name: str, what: str = "") -> APIError:
    return _bad(f"{name} is not supported by this server{what}", name, "unsupported_parameter")


def check_json(body: bytes) -> None:
    """Refuse a body that is not JSON, or that would make the parser or the validator fail (deep
    nesting, a number too long for int()), with a 400 before FastAPI parses it."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digits limit
        raise _bad(f"We could not parse the JSON body of your request: {e}") from None
    level, depth = [value], 0
    while level:  # breadth-first over the containers: no recursion
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise _bad(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
        children = (
            x
            for v in level
            if isinstance(v, (dict, list))
            for x in (v.values() if isinstance(v, dict) else v)
        )
        level = [x for x in children if isinstance(x, (dict, list))]


# --- what a checked request becomes ----------------------------------------------------------------


@dataclass
class Plan:
    """A checked generation request: prompts (token ids) and how to run each on the engine."""

    prompts: list[list[int]]
    max_tokens: int
    sampling: Sampling
    n: int
    stop: list[str]
    stop_ids: frozenset[int]
    hidden_ids: frozenset[int]
    min_tokens: int
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None = None
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)


def sampling_of(req: Any, vocab_size: int) -> Sampling:
    """The Sampling of a completions or chat request (vLLM's top_k -1 / 0 = no limit)."""
    bias = []
    for key, value in (req.logit_bias or {}).items():
        if not key.strip().isdigit() or not 0 <= int(key) < vocab_size:
            raise _bad(f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        bias.append((int(key), float(value)))
    top_p = 1.0 if req.top_p is None else req.top_p
    try:
        return Sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
            top_p=None if top_p >= 1 else max(top_p, 1e-12),  # top_p 0: the top token only (greedy)
            repetition_penalty=req.repetition_penalty or 1.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            logit_bias=tuple(sorted(bias)),
        )
    except UserError as e:
        raise _bad(str(e)) from None


# --- slow clients -----------------------------------------------------------------------------------


def read_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request (headers and body) has not arrived
    whole `seconds` after its first byte (a slowloris client holds a connection open forever else)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutProtocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:  # a new request is arriving
                self._arm()
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._disarm()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _expired(self) -> None:
            self._read_timer = None
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                return  # the request arrived whole: its response may take as long as it takes
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    return ReadTimeoutProtocol


# --- the app ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def model_name_for(cfg: ServeConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    source = cfg.ckpt if cfg.ckpt is not None else cfg.pretrained
    return Path(source).resolve().name if Path(source).exists() else str(source)


def load(cfg: ServeConfig) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for --ckpt or --pretrained, with --adapter put onto it."""
    from gpt2lab.generate import load_for_sampling

    return load_for_sampling(
        cfg.ckpt,
        cfg.pretrained,
        gpt2_vocab=cfg.gpt2_vocab,
        device=cfg.device,
        dtype=cfg.dtype,
        adapter=cfg.adapter,
        quantize=cfg.quantize,
    )


def _static_page() -> str:
    return resources.files("gpt2lab").joinpath("static/playground.html").read_text(encoding="utf-8")


def create_app(cfg: ServeConfig, model: Any = None, tokenizer: Any = None, api_key: str | None = None) -> Any:
    """The FastAPI app; loads the model unless given. app.state.engine is the running Engine."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise UserError(INSTALL_HINT) from None

    from gpt2lab import protocol as p

    if model is None:
        model, tokenizer = load(cfg)
    api = API(cfg, model, tokenizer, api_key if api_key is not None else cfg.api_key)
    engine = api.engine

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):  # type: ignore[no-untyped-def]
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="gpt2lab",
        version="1",
        summary="OpenAI-compatible completions, chat and embeddings; vLLM-compatible tokenizer endpoints",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; /openapi.json is the document
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.api = api
    errors = {
        400: {"model": p.ErrorResponse},
        401: {"model": p.ErrorResponse},
        404: {"model": p.ErrorResponse},
    }

    def error_response(e: APIError) -> Any:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Any:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> Any:  # FastAPI's 422 -> 400
        return error_response(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> Any:
        kinds = {
            404: ("not_found_error", "unknown_url"),
            405: ("invalid_request_error", "method_not_allowed"),
        }
        kind, code = kinds.get(e.status_code, ("invalid_request_error", None))
        msg = (
            f"Unknown request URL: {request.method} {request.url.path}" if e.status_code == 404 else e.detail
        )
        return error_response(APIError(e.status_code, str(msg), kind, code=code))

    def authorize(request: Request) -> None:
        api.authorize(request.headers.get("authorization", ""))

    @app.get("/health", response_model=p.Health)
    async def health() -> Any:
        return {"status": "ok", "model": api.name, "active": engine.active, "waiting": engine.waiting}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> Any:
        return HTMLResponse(api.page)

    @app.get("/v1/models", response_model=p.ModelList, responses=errors)
    async def models(request: Request) -> Any:
        authorize(request)
        return {"object": "list", "data": [api.card]}

    @app.get("/v1/models/{model_id}", response_model=p.ModelCard, responses=errors)
    async def model_card(model_id: str, request: Request) -> Any:
        authorize(request)
        if model_id != api.name:
            raise APIError(
                404, f"The model `{model_id}` does not exist", param="model", code="model_not_found"
            )
        return api.card

    @app.post(
        "/v1/completions",
        response_model=p.CompletionResponse,
        responses={**errors, 200: {"content": {"text/event-stream": {}}}},
    )
    async def completions(req: p.CompletionRequest, request: Request) -> Any:
        authorize(request)
        return await respond(request, api.plan_completion(req), chat=False)

    @app.post(
        "/v1/chat/completions",
        response_model=p.ChatCompletionResponse,
        responses={**errors, 200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(req: p.ChatCompletionRequest, request: Request) -> Any:
        authorize(request)
        return await respond(request, api.plan_chat(req), chat=True)

    @app.post("/v1/embeddings", response_model=p.EmbeddingResponse, responses=errors)
    async def embeddings(req: p.EmbeddingRequest, request: Request) -> Any:
        authorize(request)
        return await api.embed(req)

    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=errors)
    async def tokenize(req: p.TokenizeRequest, request: Request) -> Any:
        authorize(request)
        return api.tokenize(req)

    @app.post("/detokenize", response_model=p.DetokenizeResponse, responses=errors)
    async def detokenize(req: p.DetokenizeRequest, request: Request) -> Any:
        authorize(request)
        return api.detokenize(req)

    @app.get("/tokenizer_info", response_model=p.TokenizerInfo, responses=errors)
    async def tokenizer_info(request: Request) -> Any:
        authorize(request)
        return api.tokenizer_info()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> Any:  # a bug: say so in JSON (_CatchAll logs it)
        return error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

    async def respond(request: Request, plan: Plan, chat: bool) -> Any:
        """Run a checked request through the engine; answer in /v1/completions' or the chat format."""
        if plan.stream:
            release = api.take_stream()  # taken here, before any await: admission is atomic
            try:
                run = api.submit(plan)
            except APIError:
                release()
                raise

            class CountedStream(StreamingResponse):
                async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                    try:
                        await super().__call__(scope, receive, send)
                    finally:
                        release()
                        run.cancel()

            headers = {"Cache-Control": "no-cache"}
            return CountedStream(api.sse(run, chat), media_type="text/event-stream", headers=headers)
        run = api.submit(plan)
        try:
            done = await run.wait(request)
        finally:
            run.cancel()  # a no-op when every row has finished
        if not done:  # the client went away: nobody reads this (499: nginx's "client closed request")
            return Response(status_code=499)
        return api.final(run, chat)

    return _CatchAll(app)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """Pydantic's first error as an OpenAI-style 400 naming the top-level field (param)."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return _bad(f"Unrecognized request argument supplied: {loc[-1] if loc else param}", param)
    if first.get("type") == "json_invalid":
        return _bad(f"We could not parse the JSON body of your request: {first.get('msg')}")
    tags = ("str", "int", "float", "bool", "none", "constrained-")
    where = ".".join(x for k, x in enumerate(loc) if k == 0 or not ("[" in x or x.startswith(tags)))
    msg = str(first.get("msg", "bad input"))
    if "input" in first and first.get("type") != "missing":
        msg += f" (got {json.dumps(first['input'], default=str)[:80]})"
    return _bad(f"{where}: {msg}" if where else f"invalid request: {msg}", param)


class _CatchAll:
    """The outermost ASGI layer: reads bodies within the size limit and checks them as JSON (so a body
    that would break the parser is a 400), and turns an unexpected exception into a JSON 500 whose
    connection stays open, instead of a traceback and a dropped keep-alive connection."""

    def __init__(self, app: Any):
        self.app = app
        self.state = app.state
        self.api: API = app.state.api

    def __getattr__(self, name: str) -> Any:  # tests and uvicorn reach the FastAPI app through us
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._checked_body(scope, receive)
                # every body here is JSON, whatever the client's Content-Type says (curl -d sends a form's)
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            await self.app(scope, receive, tracked)
        except APIError as e:
            if not started:
                await self._json(tracked, e.status, e.body(), e.headers)
        except Exception as e:
            print(f"gpt2lab serve: internal error: {''.join(traceback.format_exception(e))}", file=sys.stderr)
            if not started:
                body = APIError(500, f"internal error: {type(e).__name__}", "server_error").body()
                await self._json(tracked, 500, body, None)

    async def _checked_body(self, scope: Any, receive: Any) -> Any:
        limit = self.api.cfg.max_body_bytes
        too_big = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_big
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise APIError(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body:
            check_json(body)
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _json(send: Any, status: int, body: Any, headers: dict[str, str] | None) -> None:
        data = json.dumps(body).encode()
        extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": head + extra})
        await send({"type": "http.response.body", "body": data})


# --- the API, between HTTP and the engine ------------------------------------------------------------


class Run:
    """One request's jobs on the engine, and the queue their events arrive in (on the event loop)."""

    def __init__(self, api: "API", plan: Plan, jobs: list[Job], queue: asyncio.Queue[list[Event]]):
        self.api, self.plan, self.jobs, self.queue = api, plan, jobs, queue
        total = len(plan.prompts) * plan.n
        self.total = total
        self.texts = [""] * total
        self.finishes: list[str | None] = [None] * total
        self.tokens = [0] * total
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(total)]
        self.prompt_logprobs: list[list[TokenLogprob] | None] = [None] * total
        self.done = 0
        self.prompt_tokens = sum(len(p) for p in plan.prompts)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True
        self.api.engine.wake()

    def record(self, ev: Event) -> None:
        """Add an event to the response so far; raises APIError for an error event."""
        if ev.finish == "error":
            retry = {"Retry-After": "1"} if ev.status == 503 else None
            raise APIError(ev.status, ev.text, "server_error", headers=retry)
        self.texts[ev.choice] += ev.text
        self.logprobs[ev.choice] += ev.logprobs
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs[ev.choice] = ev.prompt_logprobs
        if ev.finish is not None:
            self.finishes[ev.choice], self.tokens[ev.choice] = ev.finish, ev.tokens
            self.done += 1

    async def wait(self, request: Any) -> bool:
        """Collect every event of a non-streamed request; False if the client went away meanwhile."""
        check = time.monotonic() + DISCONNECT_POLL_S
        while self.done < self.total:
            try:
                events = await asyncio.wait_for(self.queue.get(), timeout=max(0.01, check - time.monotonic()))
            except asyncio.TimeoutError:
                events = []
            if time.monotonic() >= check:  # on a clock, not when idle: text arrives every step
                if await request.is_disconnected():
                    return False
                check = time.monotonic() + DISCONNECT_POLL_S
            for ev in events:
                self.record(ev)
        return True

    def usage(self) -> dict[str, int]:
        completion = sum(self.tokens)
        total = self.prompt_tokens + completion
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": total}


class API:
    """What the routes do, with the model behind the engine: parse, plan, submit, format."""

    def __init__(self, cfg: ServeConfig, model: Any, tokenizer: Any, key: str | None):
        self.cfg, self.tok, self.key = cfg, tokenizer, key
        self.name = model_name_for(cfg)
        self.block_size = model.config.block_size
        self.n_embd = model.config.n_embd
        self.engine = Engine(
            model,
            tokenizer.decode_bytes,
            tokenizer.vocab_size,
            cfg.max_batch_size,
            cfg.max_queue,
            cfg.compile,
        )
        self.vocab_size = self.engine.vocab_size
        max_tokens = min(cfg.max_tokens, self.block_size - 1)
        created = int(time.time())
        self.card = {
            "id": self.name,
            "object": "model",
            "created": created,
            "owned_by": "gpt2lab",
            "context_length": self.block_size,
            "max_tokens": max_tokens,
            "max_model_len": self.block_size,  # vLLM's name for the context length
        }
        self.page = _static_page()
        self.streams = 0  # open streaming responses (touched only on the event loop)
        self.special_ids = frozenset(getattr(tokenizer, "special_tokens", {}).values())

    # --- checks

    def authorize(self, header: str) -> None:
        if self.key is None:
            return
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(
                401, "You didn't provide an API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )
        if not hmac.compare_digest(given.strip().encode(), self.key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server has `{self.name}`",
                param="model",
                code="model_not_found",
            )

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        """Text -> ids; special-token text stays plain text (as OpenAI's API does)."""
        try:
            return self.tok.encode(text)
        except UserError as e:  # e.g. a character outside a char model's alphabet
            raise _bad(f"{param}: {e}", param) from None

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.tok.vocab_size]
        if bad:
            raise _bad(
                f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.tok.vocab_size})", param
            )
        return ids

    def take_stream(self) -> Callable[[], None]:
        """Count one more open stream, or 429; returns the function that gives it back (once)."""
        if self.streams >= self.cfg.max_streams:
            raise APIError(
                429,
                f"too many concurrent streams (limit {self.cfg.max_streams})",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.streams += 1
        given = False

        def release() -> None:
            nonlocal given
            if not given:
                given = True
                self.streams -= 1

        return release

    # --- plans

    def _common(self, req: Any, prompts: list[list[int]], max_tokens: int, stop_ids: set[int]) -> Plan:
        cfg = self.cfg
        self.check_model(req.model)
        if req.n > cfg.max_n:
            raise _bad(f"n must be at most {cfg.max_n}, got {req.n}", "n")
        if max_tokens > cfg.max_tokens:
            raise _bad(f"max_tokens must be at most {cfg.max_tokens}, got {max_tokens}", "max_tokens")
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.block_size:
            raise _bad(
                f"This model's maximum context length is {self.block_size} tokens, however you requested "
                f"{longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the completion). "
                f"Please reduce your prompt; or completion length.",
                "prompt" if longest >= self.block_size else "max_tokens",
                "context_length_exceeded",
            )
        limit = cfg.max_prompt_tokens
        if limit is not None and longest > limit:
            raise _bad(
                f"the prompt has {longest} tokens; this server allows at most {limit}",
                "prompt",
                "context_length_exceeded",
            )
        stop = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if len(stop) > cfg.max_stop:
            raise _bad(f"stop may have at most {cfg.max_stop} sequences, got {len(stop)}", "stop")
        if req.stream_options is not None and not req.stream:
            raise _bad("stream_options is only allowed when stream is true", "stream_options")
        total = len(prompts) * req.n
        if total > cfg.max_batch_size + cfg.max_queue:  # would be refused however long the client waits
            raise _bad(
                f"this request needs {total} sequences ({len(prompts)} prompts x n {req.n}); the server "
                f"holds at most {cfg.max_batch_size + cfg.max_queue} (batch + queue)",
                "n",
            )
        extra = set(self.check_ids(list(req.stop_token_ids or []), "stop_token_ids"))
        hidden = set(self.special_ids) if req.skip_special_tokens else set()
        stop_ids = (set() if req.ignore_eos else set(stop_ids)) | extra
        return Plan(
            prompts=prompts,
            max_tokens=max_tokens,
            sampling=sampling_of(req, self.vocab_size),
            n=req.n,
            stop=stop,
            stop_ids=frozenset(stop_ids),
            hidden_ids=frozenset(hidden - stop_ids),
            min_tokens=req.min_tokens,
            seed=req.seed,
            stream=bool(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )

    def plan_completion(self, req: Any) -> Plan:
        if req.suffix is not None:
            raise _unsupported("suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise _unsupported("best_of", " (only best_of = n)")
        p = req.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items:
            raise _bad("prompt must not be an empty list", "prompt")
        if len(items) > self.cfg.max_prompts:
            raise _bad(f"at most {self.cfg.max_prompts} prompts per request, got {len(items)}", "prompt")
        prompts, texts = [], []
        for item in items:
            ids = self.encode(item) if isinstance(item, str) else self.check_ids(list(item))
            if not ids:  # as generate.py: an empty prompt starts a new document
                ids = [self.tok.eot_id]
            prompts.append(ids)
            texts.append(item if isinstance(item, str) else self.tok.decode(ids))
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # 16: OpenAI's default
        if max_tokens == 0 and not req.echo:
            raise _bad("max_tokens may be 0 only with echo (to score the prompt)", "max_tokens")
        plan = self._common(req, prompts, max_tokens, {self.tok.eot_id})
        plan.logprobs, plan.echo, plan.prompt_texts = req.logprobs, req.echo, texts
        return plan

    def plan_chat(self, req: Any) -> Plan:
        from gpt2lab import sft

        for name in ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "audio"):
            if getattr(req, name) is not None:
                raise _unsupported(name, " (no tool calls or audio)")
        for name in ("reasoning_effort", "prediction", "web_search_options", "verbosity"):
            if getattr(req, name) is not None:
                raise _unsupported(name)
        if req.response_format is not None and req.response_format.type != "text":
            raise _unsupported("response_format", " (only text)")
        if req.modalities is not None and req.modalities != ["text"]:
            raise _unsupported("modalities", " (only text)")
        if req.top_logprobs is not None and not req.logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        ids = self.render_chat(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # OpenAI's chat default: as much as the context leaves (within our limit)
            max_tokens = max(1, min(self.cfg.max_tokens, self.block_size - len(ids)))
        try:
            stop_ids = set(sft.chat_stop_ids(self.tok))
        except UserError as e:
            raise _bad(str(e), "messages") from None
        plan = self._common(req, [ids], max_tokens, stop_ids)
        plan.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return plan

    def render_chat(self, messages: list[Any], add_generation_prompt: bool = True) -> list[int]:
        """OpenAI's messages in the chat template of sft.py: text parts joined, "developer" read as
        "system"; a model without the template's tokens is a 400 saying so."""
        from gpt2lab import sft

        plain = []
        for m in messages:
            content = m.content if isinstance(m.content, str) else "".join(x.text for x in m.content or [])
            plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:
            return sft.render_chat(self.tok, plain, add_generation_prompt)
        except UserError as e:  # a model without the chat template's tokens, a character outside its alphabet
            raise _bad(str(e), "messages") from None

    # --- running

    def submit(self, plan: Plan) -> Run:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()

        def deliver(events: list[Event]) -> None:  # engine thread -> event loop
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, events)

        deadline = time.monotonic() + self.cfg.request_timeout_s
        jobs = []
        for i, ids in enumerate(plan.prompts):
            first = i * plan.n
            seeds = [None if plan.seed is None else choice_seed(plan.seed, first + s) for s in range(plan.n)]
            jobs.append(
                Job(
                    ids,
                    plan.max_tokens,
                    plan.sampling,
                    deliver,
                    n=plan.n,
                    seeds=seeds,
                    stop_ids=plan.stop_ids,
                    stop=plan.stop,
                    first_choice=first,
                    deadline=deadline,
                    min_tokens=plan.min_tokens,
                    hidden_ids=plan.hidden_ids,
                    logprobs=plan.logprobs,
                    echo=plan.echo,
                )
            )
        try:
            self.engine.submit(jobs)
        except QueueFull as e:
            raise APIError(
                503,
                f"The server is overloaded: {e}; retry shortly",
                "server_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            ) from None
        return Run(self, plan, jobs, queue)

    # --- formatting

    def token_str(self, token: int) -> str:
        return self.tok.decode_bytes([token]).decode("utf-8", errors="replace")

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
        """OpenAI's completions logprobs object for tokens (ids with their log-probabilities)."""
        tokens, values, tops, offsets = [], [], [], []
        for token, lp, top in entries:
            s = self.token_str(token)
            tokens.append(s)
            values.append(lp)
            offsets.append(offset)
            offset += len(s)
            tops.append(None if top is None else {self.token_str(t): v for t, v in top})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        def one(t: int, v: float) -> dict[str, Any]:
            return {"token": self.token_str(t), "logprob": v, "bytes": list(self.tok.decode_bytes([t]))}

        return {
            "content": [
                {**one(t, v or 0.0), "top_logprobs": [one(a, b) for a, b in top or []]}
                for t, v, top in entries
            ]
        }

    def final(self, run: Run, chat: bool) -> dict[str, Any]:
        plan = run.plan
        rid, now = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        choices = []
        for i in range(run.total):
            text, finish = run.texts[i], run.finishes[i]
            if chat:
                lp = None if plan.logprobs is None else self.chat_logprobs(run.logprobs[i])
                message = {"role": "assistant", "content": text}
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
                continue
            prompt_text = plan.prompt_texts[i // plan.n]
            lp = None
            if plan.logprobs is not None:
                entries = (run.prompt_logprobs[i] or []) + run.logprobs[i]
                lp = self.completion_logprobs(entries, 0 if plan.echo else len(prompt_text))
            if plan.echo:
                text = prompt_text + text
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
        kind = "chat.completion" if chat else "text_completion"
        return {
            "id": rid,
            "object": kind,
            "created": now,
            "model": self.name,
            "choices": choices,
            "usage": run.usage(),
        }

    async def sse(self, run: Run, chat: bool) -> Any:
        """Server-sent events of a streamed request: chunks, then a usage chunk if asked, then [DONE]."""
        plan = run.plan
        rid, now = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        started: set[int] = set()
        offsets = [
            len(plan.prompt_texts[i // plan.n]) if plan.prompt_texts and not plan.echo else 0
            for i in range(run.total)
        ]

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            obj: dict[str, Any] = {
                "id": rid,
                "object": kind,
                "created": now,
                "model": self.name,
                "choices": choices,
            }
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        while run.done < run.total:
            for ev in await run.queue.get():
                try:
                    run.record(ev)
                except APIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                    return
                entries = (ev.prompt_logprobs or []) + ev.logprobs
                choice: dict[str, Any] = {"index": ev.choice, "logprobs": None}
                if chat:  # OpenAI's deltas: the role comes once, in a choice's first chunk
                    delta = {"content": ev.text} if ev.text or ev.choice in started else {}
                    if ev.choice not in started:
                        delta = {"role": "assistant", "content": ev.text}
                        started.add(ev.choice)
                    choice["delta"] = delta
                    if plan.logprobs is not None and entries:
                        choice["logprobs"] = self.chat_logprobs(entries)
                else:
                    text = ev.text
                    if plan.echo and ev.prompt_logprobs is not None:
                        text = plan.prompt_texts[ev.choice // plan.n] + text
                    choice["text"] = text
                    if plan.logprobs is not None and entries:
                        choice["logprobs"] = self.completion_logprobs(entries, offsets[ev.choice])
                        offsets[ev.choice] += sum(len(s) for s in choice["logprobs"]["tokens"])
                yield chunk([{**choice, "finish_reason": ev.finish}])
        if plan.include_usage:
            yield chunk([], run.usage())
        yield "data: [DONE]\n\n"

    async def embed(self, req: Any) -> dict[str, Any]:
        self.check_model(req.model)
        if req.dimensions is not None and req.dimensions != self.n_embd:
            raise _unsupported("dimensions", f" (only the model's {self.n_embd})")
        x = req.input
        items = [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)
        if not items or len(items) > self.cfg.max_prompts * 8:
            raise _bad(f"input must hold 1 to {self.cfg.max_prompts * 8} items", "input")
        inputs = []
        for item in items:
            ids = self.encode(item, "input") if isinstance(item, str) else self.check_ids(list(item), "input")
            if not ids:
                raise _bad("input must not be empty", "input")
            if len(ids) > self.block_size:
                raise _bad(
                    f"input has {len(ids)} tokens; this model's context is {self.block_size}",
                    "input",
                    "context_length_exceeded",
                )
            inputs.append(ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Any, Any]] = loop.create_future()

        def deliver(vectors: Any, error: str | None) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result((vectors, error)))

        try:
            self.engine.submit([EmbedJob(inputs, deliver)])
        except QueueFull as e:
            raise APIError(
                503, f"The server is overloaded: {e}", "server_error", headers={"Retry-After": "1"}
            ) from None
        vectors, error = await future
        if error is not None:
            raise APIError(500, error, "server_error")
        data = []
        for i, v in enumerate(vectors):
            vec: Any = v
            if req.encoding_format == "base64":  # OpenAI's: little-endian float32, base64
                vec = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        n = sum(len(ids) for ids in inputs)
        return {
            "object": "list",
            "data": data,
            "model": self.name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    def tokenize(self, req: Any) -> dict[str, Any]:
        """vLLM's /tokenize. Special-token text is read as special tokens here (lm-eval reads the EOS id
        back from its text), unlike in prompts of /v1/completions."""
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise _bad("give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            ids = self.render_chat(req.messages, req.add_generation_prompt)
        else:
            try:
                ids = self.tok.encode(req.prompt, allowed_special="all")
            except UserError as e:
                raise _bad(f"prompt: {e}", "prompt") from None
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.block_size, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [self.token_str(t) for t in ids]
        return out

    def detokenize(self, req: Any) -> dict[str, Any]:
        self.check_model(req.model)
        return {"prompt": self.tok.decode(self.check_ids(list(req.tokens), "tokens"))}

    def tokenizer_info(self) -> dict[str, Any]:
        """vLLM's /tokenizer_info: enough of a tokenizer_config.json for lm-eval's remote tokenizer."""
        from gpt2lab import sft

        specials = dict(getattr(self.tok, "special_tokens", {}))
        eos = next((t for t, i in specials.items() if i == self.tok.eot_id), None)
        chat = all(t in specials for t in sft.TEMPLATE_TOKENS)
        return {
            "tokenizer_class": f"gpt2lab.{type(self.tok).__name__}",
            "name": self.tok.name,
            "eos_token": eos,
            "bos_token": eos,  # GPT-2 starts documents with <|endoftext|> too
            "pad_token": None,
            "model_max_length": self.block_size,
            "vocab_size": self.tok.vocab_size,
            "added_tokens": specials,
            "chat_template": CHAT_TEMPLATE if chat else None,
        }


# sft.render_chat's template in Jinja (for clients that render prompts themselves, e.g. lm-eval)
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}{% for m in messages %}"
    "{% set role = 'system' if m['role'] == 'developer' else m['role'] %}"
    "{{ '<|' + role + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and api_key is None:
        raise UserError(
            f"--host {host} is reachable from other machines: give --api-key KEY (or set GPT2LAB_API_KEY)"
        )


def uvicorn_config(app: Any, cfg: ServeConfig, **kw: Any) -> Any:
    """uvicorn's Config with the server's connection limits (see the module docstring)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        http=read_timeout_protocol(cfg.read_timeout_s),
        limit_concurrency=cfg.max_connections,
        timeout_keep_alive=5,
        **kw,
    )


def run(cfg: ServeConfig) -> None:
    """`gpt2lab serve`: load the model and serve it until interrupted."""
    key = cfg.api_key if cfg.api_key is not None else (os.environ.get("GPT2LAB_API_KEY") or None)
    check_bind(cfg.host, key)
    try:
        import uvicorn
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    app = create_app(cfg, api_key=key)
    model = app.state.engine.model
    print(
        f"gpt2lab serve: {model_name_for(cfg)} ({model.num_params() / 1e6:.2f}M parameters, context "
        f"{model.config.block_size}) on {app.state.engine.device}; http://{cfg.host}:{cfg.port}/ "
        f"(API at /v1{', API key required' if key else ''})",
        flush=True,
    )
    uvicorn.Server(uvicorn_config(app, cfg)).run()
