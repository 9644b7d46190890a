"""The OpenAI-compatible HTTP API over a serving.Engine (a Starlette app; scripts/serve.py runs it on uvicorn).

    app = make_app(engine, run.tokenizer, model_name="sft", chat=True, api_key=None)

Endpoints, in OpenAI's request and response shapes so the official `openai` client works unchanged:
  GET  /health               {"status": "ok", "model", "context", "slots", "busy", "free", "waiting", ...}
  GET  /v1/models            the one model served (its id: the run's name)
  POST /v1/completions       prompt: a string, a list of strings, a list of token ids, or a list of those
  POST /v1/chat/completions  messages rendered with the run's chat template (400 when the run has none)
Fields: model, max_tokens (chat: also max_completion_tokens), temperature, top_p, stop, seed, n,
logprobs / top_logprobs, stream (+ stream_options.include_usage); extras top_k, min_p,
repetition_penalty, presence_penalty, frequency_penalty (model/sampling.py). Defaults as OpenAI's:
temperature 1, max_tokens 16 for completions and the rest of the context for chat, a random seed.
Completions stop at <eos>, chat at <|end|>; log-probs and usage count that stop token (its text is "").
Log-probs are of the raw model distribution (temperature 1). text_offset counts characters from the
start of the generated text. With --api_key, /v1/* need `Authorization: Bearer KEY`; /health does not.
Errors are OpenAI's JSON {"error": {"message", "type", "param", "code"}}: 400 bad JSON, a bad field or
a prompt too long for the context, 401 API key, 404 unknown model, 413 body too large, 429 queue full.
The answers' JSON (responses, stream chunks, log-probs) is built in openai_shapes.py.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import secrets
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import openai_shapes as shapes
import serving
from data import chat as chat_template
from data.tokenizer import Tokenizer
from model.sampling import Sampling

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without an API key, unless told `insecure`."""
    if api_key or insecure or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"--host={host} is reachable from other machines: give --api_key (or set LMSTACK_API_KEY), "
                     f"or --insecure to serve it without one")


def make_app(engine: serving.Engine, tokenizer: Tokenizer, *, model_name: str, chat: bool,
             api_key: str | None = None, max_body_bytes: int = 1 << 20) -> Starlette:
    api = _Api(engine, tokenizer, model_name, chat, api_key, max_body_bytes)

    async def http_error(request, exc: HTTPException):
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

    routes = [Route("/health", api.health), Route("/v1/models", api.models),
              Route("/v1/models/{model:path}", api.model),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


# ---- reading requests ---------------------------------------------------------------------------
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
          list: "a list"}


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(body: dict, name: str, kind: type, default=None, where: str = ""):
    """body[name] checked to be of `kind` (JSON null or absent: default); `where` prefixes a nested field's name."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ApiError(400, f"{where}{name}={_show(value)} must be {_KINDS[kind]}", param=where + name,
                       code="invalid_type")
    return value


def _in_range(name: str, value, lo, hi=None):
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"{name}={value} must be {bound}", param=name, code="invalid_value")
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop={_show(stop)} must be a string or a list of strings", param="stop",
                       code="invalid_type")
    return tuple(s for s in stops if s)


def _sampling(body: dict) -> Sampling:
    try:
        return Sampling(temperature=_field(body, "temperature", float, 1.0), top_p=_field(body, "top_p", float, 1.0),
                        top_k=_field(body, "top_k", int, 0), min_p=_field(body, "min_p", float, 0.0),
                        repetition_penalty=_field(body, "repetition_penalty", float, 1.0),
                        presence_penalty=_field(body, "presence_penalty", float, 0.0),
                        frequency_penalty=_field(body, "frequency_penalty", float, 0.0))
    except ValueError as e:  # sampling.SamplingError names the request's field
        raise ApiError(400, str(e), param=getattr(e, "field", None), code="invalid_value") from None


def _refuse_unsupported(body: dict) -> None:
    for name, unsupported in (("echo", body.get("echo") is True), ("suffix", bool(body.get("suffix"))),
                              ("logit_bias", bool(body.get("logit_bias"))), ("tools", bool(body.get("tools"))),
                              ("best_of", body.get("best_of") not in (None, body.get("n", 1))),
                              # JSON mode / schemas would need constrained decoding; plain text is what it gives
                              ("response_format", body.get("response_format") not in (None, {"type": "text"}))):
        if unsupported:
            raise ApiError(400, f"{name}={_show(body[name])} is not supported by this server", param=name,
                           code="unsupported")


# ---- the endpoints --------------------------------------------------------------------------------
class _Api:
    def __init__(self, engine, tok, model_name, has_chat, api_key, max_body_bytes):
        self.engine, self.tok, self.model_name, self.has_chat = engine, tok, model_name, has_chat
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.context, self.n_top = engine.dec.cache_len, engine.dec.n_top
        self.created = int(time.time())

    async def health(self, request: HttpRequest):
        return JSONResponse({"status": "ok", "model": self.model_name, "context": self.context, **self.engine.stats()})

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmstack"}

    async def models(self, request: HttpRequest):
        return await self._guard(request, lambda: {"object": "list", "data": [self._model_card()]})

    async def model(self, request: HttpRequest):
        def card():
            self._check_model(request.path_params["model"])
            return self._model_card()
        return await self._guard(request, card)

    async def completions(self, request: HttpRequest):
        return await self._guard(request, lambda: self._completions(request), read_body=True)

    async def chat_completions(self, request: HttpRequest):
        return await self._guard(request, lambda: self._chat(request), read_body=True)

    async def _guard(self, request: HttpRequest, handle, read_body: bool = False):
        """API key, then the body (size limit, JSON object); ApiError -> OpenAI's error JSON."""
        try:
            if self.api_key is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                   code="invalid_api_key")
            if read_body:
                request.state.body = await self._read_json(request)
            out = handle()
            if asyncio.iscoroutine(out):
                out = await out
            return out if isinstance(out, Response) else JSONResponse(out)
        except ApiError as e:
            return e.response()

    async def _read_json(self, request: HttpRequest) -> dict:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                           f"(--max_body_bytes)", code="request_too_large")
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes (--max_body_bytes)",
                               code="request_too_large")
        try:
            body = json.loads(bytes(data))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_show(body)}", code="invalid_json")
        return body

    def _check_model(self, model) -> None:
        if model != self.model_name:
            raise ApiError(404, f"model {model!r} not found: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _check_context(self, prompt_tokens: int, max_new: int, param: str, default: bool = False) -> None:
        if prompt_tokens + max_new > self.context:
            given = " (not given: the default)" if default else ""
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens and {param}{given}={max_new}: "
                           f"{prompt_tokens} + {max_new} = {prompt_tokens + max_new} > the context of {self.context} "
                           f"tokens",
                           param=param, code="context_length_exceeded")

    def _prompts(self, value) -> list[list[int]]:
        is_id = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
        if isinstance(value, str):
            items = [value]
        elif isinstance(value, list) and value and (all(isinstance(x, str) for x in value) or
                                                     all(isinstance(x, list) for x in value)):
            items = value
        elif isinstance(value, list) and value and all(is_id(x) for x in value):
            items = [value]
        else:
            raise ApiError(400, f"prompt={_show(value)} must be a string, a list of strings, a list of token ids "
                           f"or a list of such lists", param="prompt", code="invalid_type")
        prompts = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                try:
                    ids = [int(x) for x in self.tok.encode(item)]
                except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in the JSON): not text
                    raise ApiError(400, f"prompt[{i}] is not valid Unicode text ({e.reason} at character "
                                   f"{e.start})", param="prompt", code="invalid_value") from None
            elif all(is_id(x) for x in item):
                bad = [x for x in item if not 0 <= x < self.tok.vocab_size]
                if bad:
                    raise ApiError(400, f"prompt[{i}] has token id {bad[0]} outside [0, {self.tok.vocab_size})",
                                   param="prompt", code="invalid_value")
                ids = list(item)
            else:
                raise ApiError(400, f"prompt[{i}]={_show(item)} must be a list of token ids", param="prompt",
                               code="invalid_type")
            if not ids:
                raise ApiError(400, f"prompt[{i}] is empty: give at least one token" if len(items) > 1 else
                               "the prompt is empty: give at least one token", param="prompt", code="empty_prompt")
            prompts.append(ids)
        return prompts

    def _requests(self, body, prompts, max_new, stop_ids, top: int) -> tuple[list[serving.Request], dict]:
        """One serving.Request per (prompt, choice): seeds seed, seed + 1, ... for the n choices."""
        _refuse_unsupported(body)
        n = _in_range("n", _field(body, "n", int, 1), 1)
        if n * len(prompts) > self.engine.max_queue:
            raise ApiError(400, f"n={n} x {len(prompts)} prompts = {n * len(prompts)} completions, more than the "
                           f"queue holds (max_queue={self.engine.max_queue})", param="n", code="invalid_value")
        seed = _field(body, "seed", int, None)
        seed = secrets.randbelow(1 << 32) if seed is None else _in_range("seed", seed, 0, (1 << 32) - 1)
        sampling, stops = _sampling(body), _stop_strings(body)
        reqs = [serving.Request(prompt=p, max_new=max_new, sampling=sampling, seed=(seed + j) % (1 << 32),
                                stop_ids=stop_ids, stop_strings=stops, index=i * n + j, top_logprobs=top > 0)
                for i, p in enumerate(prompts) for j in range(n)]
        options = _field(body, "stream_options", dict, {})
        return reqs, {"stream": _field(body, "stream", bool, False),
                      "include_usage": bool(_field(options, "include_usage", bool, False, where="stream_options.")),
                      "prompt_tokens": sum(len(p) for p in prompts)}

    async def _completions(self, request: HttpRequest):
        body = request.state.body
        self._check_model(_field(body, "model", str, self.model_name))
        if "prompt" not in body:
            raise ApiError(400, "missing field 'prompt'", param="prompt", code="missing_field")
        prompts = self._prompts(body["prompt"])
        max_new = _in_range("max_tokens", _field(body, "max_tokens", int, 16), 1)
        for p in prompts:  # OpenAI's completions default is 16 tokens: say so when the request did not set it
            self._check_context(len(p), max_new, "max_tokens", default=body.get("max_tokens") is None)
        logprobs = _field(body, "logprobs", int, None)
        if logprobs is not None:
            _in_range("logprobs", logprobs, 0, self.n_top)
        reqs, opts = self._requests(body, prompts, max_new, (self.tok.eos_id,), logprobs or 0)
        view = shapes.TextView(self.model_name, self.tok, logprobs)
        return await self._answer(request, reqs, view, **opts)

    async def _chat(self, request: HttpRequest):
        body = request.state.body
        self._check_model(_field(body, "model", str, self.model_name))
        if not self.has_chat:
            raise ApiError(400, f"model {self.model_name!r} has no chat template (its run wrote no "
                           f"chat_template.json: not an SFT run); use /v1/completions", code="chat_unavailable")
        messages = _field(body, "messages", list, None)
        if not messages:
            raise ApiError(400, "missing field 'messages' (a non-empty list)", param="messages", code="missing_field")
        try:
            rendered = chat_template.render_prompt([_message(m, i) for i, m in enumerate(messages)], self.tok)
            prompt = [int(x) for x in rendered]
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        limit = _field(body, "max_completion_tokens", int, None)
        param = "max_completion_tokens" if limit is not None else "max_tokens"
        limit = _field(body, "max_tokens", int, None) if limit is None else limit
        if limit is None and len(prompt) >= self.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens: no room left in the context of "
                           f"{self.context} tokens", param="messages", code="context_length_exceeded")
        limit = _in_range(param, self.context - len(prompt) if limit is None else limit, 1)
        self._check_context(len(prompt), limit, param)
        top = _field(body, "top_logprobs", int, None)
        logprobs = _field(body, "logprobs", bool, False)
        if top is not None:
            _in_range("top_logprobs", top, 0, self.n_top)
            if not logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        stop_ids = (self.tok.special_id(chat_template.END_TOKEN), self.tok.eos_id)
        reqs, opts = self._requests(body, [prompt], limit, stop_ids, (top or 0) if logprobs else 0)
        view = shapes.ChatView(self.model_name, self.tok, (top or 0) if logprobs else None)
        return await self._answer(request, reqs, view, **opts)

    async def _answer(self, request, reqs, view, *, stream: bool, include_usage: bool, prompt_tokens: int):
        job = _Job(self.engine, reqs, stream=stream)
        if stream:
            return StreamingResponse(self._stream(job, view, include_usage, prompt_tokens),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(job.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():
                return Response(status_code=499)  # the client left; nobody reads this
            choices = collect.result()
        finally:
            gone.cancel()
            collect.cancel()
            job.cancel()
        return view.response(choices, shapes.usage(prompt_tokens, choices))

    async def _stream(self, job, view, include_usage: bool, prompt_tokens: int):
        extra = {"usage": None} if include_usage else {}
        try:
            for chunk in view.opening(len(job.requests)):
                yield shapes.sse({**chunk, **extra})
            async for choice, update in job.updates():
                yield shapes.sse({**view.chunk(choice, update), **extra})
            if include_usage:
                total = shapes.usage(prompt_tokens, job.choices)
                yield shapes.sse({**view.head(chunk=True), "choices": [], "usage": total})
        except ApiError as e:
            yield shapes.sse(e.body())
        finally:
            job.cancel()  # the client went away (this generator was cancelled), or all is done
        yield "data: [DONE]\n\n"


def _message(m, i: int) -> dict:
    """An OpenAI message -> the chat template's {role, content}; text parts joined, 'developer' = 'system'."""
    if not isinstance(m, dict):
        raise ApiError(400, f"messages[{i}]={_show(m)} must be an object", param="messages", code="invalid_type")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported, got {_show(content)}",
                           param="messages", code="unsupported")
        content = "".join(p["text"] for p in content)
    role = chat_template.ROLE_ALIASES.get(m.get("role"), m.get("role"))
    return {"role": role, "content": content}


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client hangs up (the body is already read, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Job:
    """An HTTP request's serving.Requests, their updates handed from the engine thread to this event loop.
    A streamed job wakes the loop for every update (each becomes an SSE chunk); a non-streamed one only for
    a request's last update, with everything it got (waking the loop every few tokens of every request
    had cost the engine thread its share of the interpreter under concurrent load)."""

    def __init__(self, engine: serving.Engine, requests: list[serving.Request], *, stream: bool = True):
        self.engine, self.requests = engine, requests
        self.choices = [shapes.Choice() for _ in requests]
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        held: dict[int, list] = {}  # non-streamed: each request's updates so far (engine thread only)

        def put_all(updates):
            for u in updates:
                self.queue.put_nowait(u)

        def deliver(update):
            if stream or update.error or update.finish_reason is not None:
                updates = held.pop(update.index, []) + [update]
            else:
                held.setdefault(update.index, []).append(update)
                return
            try:
                loop.call_soon_threadsafe(put_all, updates)
            except RuntimeError:  # the event loop is closed: the server is stopping
                pass
        try:
            engine.submit(requests, deliver)
        except serving.QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="queue_full") from None

    async def updates(self):
        """(choice, update) until every choice has finished; an engine error raises ApiError(500)."""
        open_ = len(self.requests)
        while open_:
            u = await self.queue.get()
            if u.error:
                raise ApiError(500, u.error, code="decoding_failed")
            choice = self.choices[u.index]
            choice.add(u)
            open_ -= u.finish_reason is not None
            yield choice, u

    async def collect(self) -> list[shapes.Choice]:
        async for _ in self.updates():
            pass
        return self.choices

    def cancel(self) -> None:
        self.engine.cancel(self.requests)
