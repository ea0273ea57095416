"""The FastAPI app: OpenAI-compatible routes over an `Engine`.

Handlers only parse, validate, tokenize (in a thread: a long prompt must not stall the loop), decode a
chat request's images and compute their features (in a thread, one request at a time), submit a
`Job` and then await events from an asyncio queue that the engine's worker fills through
`loop.call_soon_threadsafe`. Every error a request can cause is an `APIError`, answered with a 4xx
in the OpenAI shape {"error": {"message", "type", "param", "code"}}; 5xx means a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..sampling import SamplingParams
from . import schemas
from .engine import Decoding, Done, Engine, EngineConfig, Event, Failed, Job, Text, forward_width
from .guard import Guard
from .schemas import APIError

log = logging.getLogger("trimode.serve")

# Special tokens that end an assistant turn in common chat templates (added to the stop ids of chat requests).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")


@dataclass
class ServerSettings:
    model_name: str
    context: int  # the model's max_seq_len
    vocab_size: int
    has_mask: bool = True
    default_mode: str = "auto"
    default_block_len: int = 8
    # Per-mode defaults (the model's measured best, decoding.json; "auto": its speculative mode's);
    # a mode not listed uses default_block_len.
    block_lens: dict[str, int] = field(default_factory=dict)
    default_threshold: float = 0.9
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_prompt_tokens: int | None = None  # None: the context minus one
    max_block_len: int = 64
    request_timeout: float = 300.0
    max_body_bytes: int = 1 << 20  # `trimode serve` raises it for a vision-language model (cli.body_limit)
    body_timeout: float = 30.0  # seconds from a request's headers to the end of its body; then 408
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    allowed_hosts: tuple[str, ...] | None = None  # Host header allow-list (None: no check; see guard.py)
    # Images (a vision-language model): per request, encoded bytes and decoded pixels per image.
    max_images: int = 8
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    created: int = field(default_factory=schemas.now)

    @property
    def prompt_limit(self) -> int:
        cap = self.context - 1
        return cap if self.max_prompt_tokens is None else min(self.max_prompt_tokens, cap)

    @property
    def image_limits(self):
        from ..images import ImageLimits

        return ImageLimits(max_images=self.max_images, max_bytes=self.max_image_bytes,
                           max_pixels=self.max_image_pixels)


def _error(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(schemas.error_body(message, type=type, code=code), status_code=status, headers=headers)


class _RequestCounter:
    """ASGI middleware: count answered requests by route and status code."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in self.ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        status = {"code": 0}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.inc(endpoint=route, status=str(status["code"] or 499))


class _HeadWithoutBody:
    """ASGI middleware: a HEAD request is answered like its GET (status, headers, Content-Length) but
    without the body, whatever the server under the app does with one."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_headers_only)


@dataclass
class AppState:
    """What every handler reads, from `request.app.state.trimode`."""

    engine: Engine
    tokenizer: Any
    settings: ServerSettings
    chat_stop: frozenset[int]  # end-of-turn ids added to the stop ids of chat requests
    # Images are decoded and their features computed off the event loop, one request at a time (beside
    # the engine's worker): bounded memory and CPU whatever the number of clients.
    image_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))

    @classmethod
    def of(cls, request: Request) -> AppState:
        return request.app.state.trimode


def create_app(engine: Engine, tokenizer, settings: ServerSettings, *, manage_engine: bool = True) -> FastAPI:
    """The app; with manage_engine the engine starts and stops with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.trimode.image_slots = asyncio.Semaphore(1)  # bound to the loop that serves
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.close)

    app = FastAPI(title="trimode", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.trimode = AppState(engine, tokenizer, settings, frozenset(
        t for t in (tokenizer.token_to_id(n) for n in END_OF_TURN) if t is not None))
    app.add_middleware(Guard, api_key=settings.api_key, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(_RequestCounter, metrics=engine.metrics)  # outermost: refused requests count too
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)
    app.add_middleware(_HeadWithoutBody)
    # HEAD wherever GET is (load balancers' health checks): the GET's status and headers, no body.
    read = ["GET", "HEAD"]
    app.add_api_route("/v1/models", list_models, methods=read)
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=read)
    app.add_api_route("/health", health, methods=read)
    app.add_api_route("/metrics", prom, methods=read)
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


# -- errors -----------------------------------------------------------------------------------------
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error(e.status_code, str(e.detail), type=kind, headers=getattr(e, "headers", None))


class ClientGone(Exception):
    """The client closed the connection before its request was read: nobody to answer, nothing to log."""


async def _client_gone(request: Request, e: ClientGone) -> Response:
    return Response(status_code=400)  # never delivered; uvicorn drops writes to a closed connection


async def _internal(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return _error(500, f"internal server error ({type(e).__name__})", type="server_error")


# -- plain routes -------------------------------------------------------------------------------------
def model_card(s: ServerSettings) -> dict[str, Any]:
    return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "trimode",
            "max_model_len": s.context}


async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(AppState.of(request).settings)]}


async def get_model(request: Request, model_id: str) -> dict:
    s = AppState.of(request).settings
    if model_id != s.model_name:
        raise APIError(404, f"model {model_id!r} not found; this server serves {s.model_name!r}",
                       type="not_found_error", param="model", code="model_not_found")
    return model_card(s)


async def health(request: Request) -> Response:
    engine = AppState.of(request).engine
    snap = engine.snapshot()
    if not engine.alive:
        return JSONResponse({"status": "dead", **snap}, status_code=503)
    if engine.draining:  # load balancers stop routing here while in-flight requests finish
        return JSONResponse({"status": "draining", **snap}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok", **snap})


async def prom(request: Request) -> Response:
    return PlainTextResponse(AppState.of(request).engine.metrics.render(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


# -- validation: each a pure function of the request and the settings --------------------------------
async def read_json(request: Request, max_bytes: int, timeout: float | None = None) -> Any:
    """The request's JSON body: at most max_bytes, all of it within `timeout` seconds (a stalled upload
    gets 408 and the connection is closed); a client that leaves mid-upload raises ClientGone."""
    try:
        async with asyncio.timeout(timeout if timeout and timeout > 0 else None):
            body = await _read_body(request, max_bytes)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return _parse_json(body)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(length) > max_bytes:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {max_bytes}",
                           code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes) -> Any:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge integer literals, deep nesting
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    try:  # "\ud800" escapes decode to lone surrogates, which are not text: refuse them here, once
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request holds a lone UTF-16 surrogate escape (e.g. \\ud800), which is "
                            "not valid Unicode text") from None
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    return data


def check_model(req: schemas._Common, s: ServerSettings) -> None:
    if req.model is not None and req.model != s.model_name:
        raise APIError(404, f"model {req.model!r:.80} not found; this server serves {s.model_name!r}",
                       type="not_found_error", param="model", code="model_not_found")


def decoding(req: schemas._Common, s: ServerSettings, ecfg: EngineConfig | None = None) -> tuple[str, int, float]:
    """(mode, block_len, threshold) of a request, within the server's limits. ecfg: the engine's
    config, whose max_cycle_tokens bounds one request's forward width (quadratic: k(k+1) tokens)."""
    d = req.decoding or schemas.Decoding()
    mode = d.mode or s.default_mode
    block_len = d.block_len if d.block_len is not None else s.block_lens.get(mode, s.default_block_len)
    threshold = d.threshold if d.threshold is not None else s.default_threshold
    if block_len > s.max_block_len:
        raise APIError(400, f"decoding.block_len = {block_len} exceeds the server limit of {s.max_block_len}",
                       param="decoding.block_len")
    if mode not in ("ar", "auto") and not s.has_mask:
        raise APIError(400, f"decoding.mode = {mode!r} needs a mask token, which this model has not",
                       param="decoding.mode")
    if ecfg is not None:
        widest = ecfg.spec_mode if mode == "auto" else mode
        width = forward_width(widest, block_len)
        if width > ecfg.max_cycle_tokens:
            raise APIError(400, f"decoding.block_len = {block_len} makes {widest} forwards of {width} tokens per "
                                f"request, over the server's limit of {ecfg.max_cycle_tokens} (--max-cycle-tokens)",
                           param="decoding.block_len")
    return mode, block_len, threshold


def sampling(req: schemas._Common) -> SamplingParams | None:
    """None (greedy) or SamplingParams. Temperature omitted means greedy unless top_p / top_k / min_p
    ask for sampling, which then runs at OpenAI's default temperature 1."""
    asks = {k: v for k, v in (("top_p", req.top_p), ("top_k", req.top_k), ("min_p", req.min_p))
            if v is not None and v != {"top_p": 1, "top_k": 0, "min_p": 0}[k]}
    temperature = req.temperature if req.temperature is not None else (1.0 if asks else 0.0)
    if temperature == 0:
        return None  # greedy: top_p / top_k / min_p change nothing (argmax is always kept)
    try:
        return SamplingParams(temperature=float(temperature), top_p=float(req.top_p or 1.0),
                              top_k=req.top_k or 0, min_p=float(req.min_p or 0.0),
                              seed=None if req.seed is None else req.seed % 2**63)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def budget(req: schemas._Common, n_prompt: int, s: ServerSettings) -> int:
    if n_prompt > s.prompt_limit:
        raise APIError(400, f"the prompt has {n_prompt} tokens, more than the limit of {s.prompt_limit}",
                       param="prompt", code="context_length_exceeded")
    room = s.context - n_prompt
    if req.max_tokens is None:
        return max(1, min(s.default_max_tokens, room))
    if req.max_tokens > s.max_tokens_limit:
        raise APIError(400, f"max_tokens = {req.max_tokens} exceeds the server limit of {s.max_tokens_limit}",
                       param="max_tokens")
    if req.max_tokens > room:
        raise APIError(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({req.max_tokens}) exceeds the "
                            f"context of {s.context} tokens", param="max_tokens", code="context_length_exceeded")
    return req.max_tokens


def encode_completion(req: schemas.CompletionRequest, tokenizer, s: ServerSettings) -> list[int]:
    p = req.prompt_input()
    if isinstance(p, list):
        bad = [t for t in p if not 0 <= t < s.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must lie in [0, {s.vocab_size}), got {bad[:5]}", param="prompt")
        return p
    if len(p) > 32 * s.prompt_limit + 64:  # cheaper than tokenizing a megabyte to say no
        raise APIError(400, f"the prompt has {len(p)} characters, far more than the limit of "
                            f"{s.prompt_limit} tokens", param="prompt", code="context_length_exceeded")
    return tokenizer.encode(p)


def encode_chat(req: schemas.ChatRequest, tokenizer, s: ServerSettings) -> list[int]:
    messages = req.chat_messages()
    if req.text_chars() > 32 * s.prompt_limit + 64:
        raise APIError(400, f"the messages are far longer than the limit of {s.prompt_limit} tokens",
                       param="messages", code="context_length_exceeded")
    enable, _ = req.thinking()
    extra = {} if enable is None else {"enable_thinking": enable}
    try:  # special-token strings typed in a message stay text: only the template writes control tokens
        return tokenizer.encode_chat(messages, add_generation_prompt=True, **extra)
    except ValueError as e:
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
    except Exception as e:  # noqa: BLE001 (jinja errors raised by the template on these messages)
        raise APIError(400, f"the chat template rejected these messages: {type(e).__name__}: {e}"[:300],
                       param="messages") from None


# -- images ----------------------------------------------------------------------------------------
def check_images(req: schemas._Common, chat: bool, model, s: ServerSettings) -> list[tuple[str, str]]:
    """(param, url) of the request's images, after the checks that need no decoding: the model takes
    images at all, and there are at most --max-images."""
    images = req.image_urls() if chat else []
    if not images:
        return images
    if getattr(model, "vision", None) is None:
        raise APIError(400, "this model is text-only: it takes no images (image_url parts need a vision-language "
                            "checkpoint)", param=images[0][0], code="images_not_supported")
    if len(images) > s.max_images:
        raise APIError(400, f"the request has {len(images)} images, over the limit of {s.max_images} per request "
                            f"(--max-images)", param="messages", code="too_many_images")
    return images


def check_image_tokens(ids: list[int], images: list, chat: bool, model) -> None:
    """The prompt holds exactly one image token per image: the chat template placed every image, and no
    prompt without images carries image tokens (they would be decoded as plain embeddings)."""
    tower = getattr(model, "vision", None)
    if tower is None:
        return
    img = tower.config.image_token_id
    n = sum(1 for t in ids if t == img)
    if n == len(images):
        return
    if not chat:
        raise APIError(400, f"the prompt holds {n} image token(s) (id {img}), but /v1/completions takes no images: "
                            "send images as image_url parts of a user message to /v1/chat/completions",
                       param="prompt", code="invalid_image_tokens")
    raise APIError(400, f"the model's chat template did not place the {len(images)} image(s): it wrote {n} image "
                        f"token(s) (id {img})", param="messages", code="invalid_image_tokens")


def load_images(images: list[tuple[str, str]], s: ServerSettings, model) -> list:
    """Each data: URL decoded into a PIL RGB image under the server's limits; the first bad one is a 4xx
    naming its part: a remote URL (never fetched), bad base64 or image data, too many bytes (413) or
    pixels. Each is resized at once to the size preprocessing gives it (the same resize, so the same
    pixels), so that a request holds at most one full-size decoded image at a time."""
    from PIL import Image

    from ..images import ImageError, decode_data_url, load_image, resized_size

    limits = s.image_limits
    vc = model.vision.config
    out = []
    for param, url in images:
        try:
            im = load_image(decode_data_url(url, limits=limits), limits=limits)
        except ImageError as e:
            raise image_error(param, url, e, s) from None
        H, W = resized_size(vc, im.height, im.width)
        if (H, W) != (im.height, im.width) and resized_size(vc, H, W) == (H, W):
            im = im.resize((W, H), resample=Image.BICUBIC)
        out.append(im)
    return out


def image_error(param: str, url: str, e: Exception, s: ServerSettings) -> APIError:
    text = str(e)
    if url[:5].lower() != "data:":
        return APIError(400, f"{param}: {text}", param=param, code="image_url_not_supported")
    if "bytes" in text and f"limit of {s.max_image_bytes}" in text:
        return APIError(413, f"{param}: {text} (--max-image-bytes)", param=param, code="image_too_large")
    if "pixels" in text and f"limit of {s.max_image_pixels}" in text:
        return APIError(400, f"{param}: {text} (--max-image-pixels)", param=param, code="image_too_many_pixels")
    return APIError(400, f"{param}: {text}", param=param, code="invalid_image")


def expanded_length(ids: list[int], pictures: list, model) -> int:
    """The prompt's length once each image's placeholder is its token grid (what embed_prompts makes)."""
    from ..images import resized_size
    from ..vision import image_token_grid

    vc = model.vision.config
    grids = [image_token_grid(vc, *resized_size(vc, im.height, im.width)) for im in pictures]
    return len(ids) - len(pictures) + sum(len(g) for g in grids)


def embed_images(model, ids: list[int], pictures: list, s: ServerSettings) -> tuple[list[int], Any]:
    """(the expanded prompt, its image features) from the vision tower (run in a worker thread)."""
    from ..images import embed_prompts

    try:
        prompts, feats = embed_prompts(model, [ids], [pictures], limits=s.image_limits)
    except ValueError as e:
        raise APIError(400, f"cannot use these images: {e}"[:400], param="messages", code="invalid_image") from None
    return prompts[0], feats[0]


def thinking_budget(req, chat: bool, max_tokens: int, tokenizer) -> tuple | None:
    """(budget, ids of <think>, ids of </think>) for a request with a thinking budget, else None."""
    budget = req.thinking()[1] if chat else req.max_thinking_tokens
    if budget is None:
        return None
    if budget > max_tokens:
        raise APIError(400, f"max_thinking_tokens = {budget} exceeds max_tokens = {max_tokens}",
                       param="max_thinking_tokens")
    return (budget, *tokenizer.think_ids())


# -- completions --------------------------------------------------------------------------------------
async def submit(request: Request, chat: bool) -> tuple[schemas._Common, Job, asyncio.Queue]:
    """Parse and validate the request, tokenize it (in a thread), submit its Job; returns the
    request, the job and the queue its events arrive on."""
    st = AppState.of(request)
    s = st.settings
    req = schemas.parse(schemas.ChatRequest if chat else schemas.CompletionRequest,
                        await read_json(request, s.max_body_bytes, s.body_timeout))
    check_model(req, s)
    stops = req.stop_list()
    mode, block_len, threshold = decoding(req, s, st.engine.config)
    samp = sampling(req)
    if mode == "auto" and samp is not None:
        # auto picks linear or ar by load; with the match rule both emit, for one seed, the same
        # samples of the same distributions, so a seed means one text whatever the load.
        samp = dataclasses.replace(samp, acceptance="match")
    model = st.engine.model
    images = check_images(req, chat, model, s)
    ids = await asyncio.to_thread(encode_chat if chat else encode_completion, req, st.tokenizer, s)
    if not ids:
        raise APIError(400, "the prompt encodes to zero tokens", param="messages" if chat else "prompt")
    check_image_tokens(ids, images, chat, model)
    feats = None
    if images:  # one request's images at a time: decoded, the expanded length checked, then the tower
        async with st.image_slots:
            pictures = await asyncio.to_thread(load_images, images, s, model)
            budget(req, expanded_length(ids, pictures, model), s)
            ids, feats = await asyncio.to_thread(embed_images, model, ids, pictures, s)
    max_tokens = budget(req, len(ids), s)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(event: Event) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    eos = st.tokenizer.eos_id
    stop_ids = frozenset(({eos} if eos is not None else set()) | (st.chat_stop if chat else set()))
    job = Job(prompt=ids, max_tokens=max_tokens, mode=mode, block_len=block_len, threshold=threshold,
              stop_ids=stop_ids, stops=stops, sink=sink, sampling=samp,
              think=thinking_budget(req, chat, max_tokens, st.tokenizer), image_embeds=feats)
    st.engine.submit(job)  # APIError 429 when the queue is full
    return req, job, queue


async def events(request: Request, job: Job, queue: asyncio.Queue, *, watch: bool,
                 deadline: float) -> AsyncIterator[Event]:
    """The job's events until Done / Failed; cancels the job on timeout, disconnect or exit."""
    st = AppState.of(request)
    engine = st.engine
    gone = asyncio.ensure_future(request.receive()) if watch else None
    get = None
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            wait = [get] + ([gone] if gone is not None else [])
            done, _ = await asyncio.wait(wait, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                if gone is not None and gone in done:
                    if gone.result().get("type") == "http.disconnect":
                        engine.cancel(job)
                        return
                    gone = asyncio.ensure_future(request.receive())
                    continue
                engine.cancel(job)
                engine.metrics.rejected.inc(reason="timeout")
                raise APIError(408, f"the request did not finish within {st.settings.request_timeout:g} s "
                                    f"(--request-timeout)", type="timeout_error", code="timeout")
            ev = get.result()
            yield ev
            if isinstance(ev, (Done, Failed)):
                return
    finally:  # cancelled mid-wait (the client left, the server stops): no task may be left pending
        for task in (gone, get):
            if task is not None and not task.done():
                task.cancel()
        if not job.finished:
            engine.cancel(job)


async def completions(request: Request) -> Response:
    return await complete(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await complete(request, chat=True)


async def complete(request: Request, chat: bool) -> Response:
    st = AppState.of(request)
    deadline = time.monotonic() + st.settings.request_timeout  # from arrival: queueing counts
    req, job, queue = await submit(request, chat)
    reply = _Reply(schemas.new_id("chatcmpl" if chat else "cmpl"), st.settings.model_name, schemas.now(), chat)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _JobStream(st.engine, job, stream(request, job, queue, reply, include_usage, deadline),
                          media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                   "X-Accel-Buffering": "no"})
    parts: list[str] = []
    info = None
    async for ev in events(request, job, queue, watch=True, deadline=deadline):
        if isinstance(ev, Decoding):
            info = ev.info
        elif isinstance(ev, Text):
            parts.append(ev.text)
        elif isinstance(ev, Failed):
            raise ev.error
        elif isinstance(ev, Done):
            build = schemas.chat if chat else schemas.completion
            return JSONResponse(build(reply.rid, reply.name, reply.created, "".join(parts), _finish(ev.reason),
                                      ev.usage, info))
    return Response(status_code=499)  # the client went away


@dataclass(frozen=True)
class _Reply:
    rid: str
    name: str
    created: int
    chat: bool

    def delta(self, text: str | None, finish: str | None) -> dict:
        """One chunk: a text delta (None: the chat role announcement), or the finish chunk."""
        if self.chat:
            content = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return schemas.chat_chunk(self.rid, self.name, self.created, content, finish)
        return schemas.completion_chunk(self.rid, self.name, self.created, text or "", finish)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def stream(request: Request, job: Job, queue: asyncio.Queue, reply: _Reply, include_usage: bool,
                 deadline: float) -> AsyncIterator[bytes]:
    if reply.chat:
        yield _sse(reply.delta(None, None))
    info = None
    try:
        async for ev in events(request, job, queue, watch=False, deadline=deadline):
            if isinstance(ev, Decoding):
                info = ev.info
            elif isinstance(ev, Text):
                yield _sse(reply.delta(ev.text, None))
            elif isinstance(ev, Failed):
                yield _sse(ev.error.body())
            elif isinstance(ev, Done):
                yield _sse(reply.delta("", _finish(ev.reason)))
                if include_usage:
                    obj = "chat.completion.chunk" if reply.chat else "text_completion"
                    yield _sse(schemas.usage_chunk(reply.rid, reply.name, reply.created, obj, ev.usage, info))
    except APIError as e:  # a timeout once streaming has begun: report it in the stream
        yield _sse(e.body())
    yield b"data: [DONE]\n\n"


class _JobStream(StreamingResponse):
    """A streaming response that cancels its job however the response ends, even when the client left
    before the first chunk (then the body generator never starts, so its own `finally` never runs)."""

    def __init__(self, engine: Engine, job: Job, content, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._engine, self._job = engine, job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._engine.cancel(self._job)  # a no-op once the job has finished


def _finish(reason: str) -> str:
    """OpenAI finish reasons: EOS / stop token / stop string -> "stop", budget -> "length"."""
    return "length" if reason == "length" else "stop"
