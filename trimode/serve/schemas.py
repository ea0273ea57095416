"""Request and response shapes of the OpenAI-compatible API, and the errors they answer with.

Requests are parsed strictly (a string is not a number, `true` is not 1) and every value this server
cannot honour is refused with a 400 naming the field, rather than silently ignored. Responses are
plain dicts built by the helpers at the bottom, so the wire format lives in one file.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..modes import MODE_NAMES

MODES = ("auto", *MODE_NAMES)
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # as OpenAI: up to 4 stop sequences
MAX_STOP_CHARS = 256
SEED_MAX = 2**63 - 1

Float = Annotated[float, Field(allow_inf_nan=False)]


class APIError(Exception):
    """An error a request caused, answered in the OpenAI error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    # strict: no "5" for 5, no true for 1; unknown fields are ignored (clients send extras such as
    # `user`), but every known field we cannot honour is refused in `unsupported()`.
    model_config = ConfigDict(strict=True, extra="ignore")


class Decoding(_Strict):
    """The `decoding` extension field: which decoder runs this request (None: server default)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    mode: Literal["auto", "ar", "diffusion", "linear", "quadratic"] | None = None  # == MODES (a test checks)
    block_len: int | None = Field(default=None, ge=1)
    threshold: Float | None = Field(default=None, ge=0.0, le=1.0)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension (as vLLM): 0 = off
    min_p: Float | None = Field(default=None, ge=0.0, le=1.0)  # extension (as vLLM): 0 = off
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-SEED_MAX, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    decoding: Decoding | None = None
    # Thinking budget (extension): after this many tokens inside an open <think>, </think> is emitted.
    max_thinking_tokens: int | None = Field(default=None, ge=0)
    # Known OpenAI fields we do not implement: accepted only at their no-op value.
    n: int | None = None
    best_of: int | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}", param="stop")
        for s in stops:
            if not s:
                raise APIError(400, "'stop' sequences must be non-empty strings", param="stop")
            if len(s) > MAX_STOP_CHARS:
                raise APIError(400, f"'stop' sequences are limited to {MAX_STOP_CHARS} characters", param="stop")
        return stops

    def unsupported(self) -> None:
        """Refuse every value this server would otherwise have to ignore."""
        noop = {
            "n": (None, 1), "best_of": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
            "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
            "tool_choice": (None, "none", "auto"), "functions": (None, []),
        }
        for name, allowed in noop.items():
            value = getattr(self, name)
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise APIError(400, f"'{name}' = {value!r:.80} is not supported by this server "
                                    f"(allowed: {', '.join(repr(a) for a in allowed)})", param=name)
        rf = self.response_format
        if rf is not None and rf != {"type": "text"}:
            raise APIError(400, f"'response_format' = {rf!r:.80} is not supported (only {{'type': 'text'}})",
                           param="response_format")


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise APIError(400, "'prompt' as a list of strings must hold exactly one string "
                                    "(batched prompts are not supported; send one request each)", param="prompt")
            p = p[0]
        if isinstance(p, list) and not p:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        if isinstance(p, str) and not p:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        return p


class TextPart(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid")
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted and ignored (one resolution here)


class ImagePart(_Strict):
    """`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (or the bare URL string
    some clients send). Only data: URLs are used; remote URLs are refused, never fetched."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: str
    content: str | list[Part] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)


class ChatTemplateArgs(_Strict):
    enable_thinking: bool | None = None


# reasoning_effort -> (enable_thinking, max_thinking_tokens): "minimal" turns thinking off, "low" and
# "medium" bound it, "high" leaves it unbounded (max_tokens still applies).
REASONING_EFFORT = {"minimal": (False, None), "low": (True, 256), "medium": (True, 1024), "high": (True, None)}


class ChatRequest(_Common):
    messages: list[Message]
    enable_thinking: bool | None = None  # passed to the chat template (extension)
    chat_template_kwargs: ChatTemplateArgs | None = None  # vLLM's spelling of the same
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None

    def thinking(self) -> tuple[bool | None, int | None]:
        """(enable_thinking for the template, the thinking budget) this request asks for."""
        enable = self.enable_thinking
        if enable is None and self.chat_template_kwargs is not None:
            enable = self.chat_template_kwargs.enable_thinking
        budget = self.max_thinking_tokens
        if self.reasoning_effort is not None:
            e, b = REASONING_EFFORT[self.reasoning_effort]
            enable = e if enable is None else enable
            budget = b if budget is None else budget
        return enable, budget

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages for the chat template. A message with images keeps its parts in order, text as
        {"type": "text", "text"} and each image as {"type": "image"} (what VLM templates expect); any
        other message has plain string content."""
        if not self.messages:
            raise APIError(400, "'messages' must hold at least one message", param="messages")
        out: list[dict[str, Any]] = []
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise APIError(400, f"messages[{i}].role = {m.role!r:.40} is not one of {', '.join(ROLES)}",
                               param=f"messages[{i}].role")
            if m.content is None and m.role != "assistant":
                raise APIError(400, f"messages[{i}].content is required", param=f"messages[{i}].content")
            role = "system" if m.role == "developer" else m.role
            if m.has_images():
                if m.role != "user":
                    j = next(j for j, p in enumerate(m.content) if isinstance(p, ImagePart))
                    raise APIError(400, f"messages.{i}.content.{j}: images are accepted in user messages only "
                                        f"(this is a {m.role} message)", param=f"messages.{i}.content.{j}")
                out.append({"role": role, "content": [
                    {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                    for p in m.content]})
            else:
                out.append({"role": role, "content": m.text()})
        return out

    def image_urls(self) -> list[tuple[str, str]]:
        """(param, url) of every image part, in the order the chat template places them (param: its path,
        dotted as pydantic names the part's own fields)."""
        return [(f"messages.{i}.content.{j}.image_url", p.url) for i, m in enumerate(self.messages)
                if isinstance(m.content, list) for j, p in enumerate(m.content) if isinstance(p, ImagePart)]

    def text_chars(self) -> int:
        return sum(len(m.text()) for m in self.messages)


def parse(cls: type[_Common], data: Any) -> _Common:
    """Validate a decoded JSON body; ValidationError becomes a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        # The deepest error names the problem: for `content` given a list of parts, the part's bad
        # field, not "content: Input should be a valid string" from the string branch of the union.
        errs = [(_path(data, err["loc"], err["type"] == "missing"), err)
                for err in e.errors(include_url=False, include_input=False)[:16]]
        path, err = max(errs, key=lambda x: len(x[0]))
        loc = ".".join(str(x) for x in path) or None
        raise APIError(400, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc) from None
    except (ValueError, TypeError, RecursionError) as e:  # pydantic internals on pathological input
        raise APIError(400, f"invalid request: {e}"[:300]) from None
    req.unsupported()
    return req


_ABSENT = object()


def _path(data: Any, loc: tuple, missing: bool = False) -> list:
    """A pydantic error location as a path into the request: the keys and indices that exist in the
    body, without the labels pydantic adds for union branches ('str', 'list[...]', a tag, a class name);
    with `missing` (a required field left out), a last key that the body lacks stays. A label can
    equal a key (the tag 'image_url' of an image part), so of the ways to read the location the one
    that reaches its last segment, then the one that uses most of it, wins."""

    def best(node: Any, i: int) -> tuple[bool, int, list]:
        if i == len(loc):
            return False, 0, []
        key, last = loc[i], i == len(loc) - 1
        options = []
        child = _ABSENT
        if isinstance(node, dict) and isinstance(key, str) and key in node:
            child = node[key]
        elif isinstance(node, list) and isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(node):
            child = node[key]
        if child is not _ABSENT:
            done, n, rest = best(child, i + 1)
            options.append((done or last, n + 1, [key, *rest]))
        elif last and missing and isinstance(node, dict) and isinstance(key, str):
            options.append((True, 1, [key]))  # a missing field
        options.append(best(node, i + 1))  # a label: skip it
        return max(options, key=lambda o: (o[0], o[1]))

    return best(data, 0)[2]


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, forwards: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "forwards": forwards,
        "tokens_per_forward": round(completion_tokens / forwards, 4) if forwards else 0.0,
    }


def completion(rid: str, model: str, created: int, text: str, finish: str | None, use: dict | None,
               decoding: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        out["usage"] = use
    if decoding is not None:
        out["decoding"] = decoding
    return out


def chat(rid: str, model: str, created: int, text: str, finish: str | None, use: dict | None,
         decoding: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish}],
    }
    if use is not None:
        out["usage"] = use
    if decoding is not None:
        out["decoding"] = decoding
    return out


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict, decoding: dict | None) -> dict[str, Any]:
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
    if decoding is not None:
        out["decoding"] = decoding
    return out
