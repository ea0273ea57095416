"""Images through the OpenAI-compatible server: `image_url` content parts (base64 data: URLs) on a tiny
random vision-language model (scripts/make_tiny_vlm.py) served by the real engine. The answer with an
image equals `trimode.generate` AR with the same image (one and two images, linear and ar, streamed and
not); every bad image is an OpenAI-shaped 4xx naming the part and the problem, never a 5xx; the
same through the real `openai` client against a `trimode serve` subprocess."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
from fastapi.testclient import TestClient  # noqa: E402

import trimode  # noqa: E402
from trimode.images import embed_prompts  # noqa: E402
from trimode.serve.app import ServerSettings, create_app  # noqa: E402
from trimode.serve.cli import TEXT_BODY_BYTES, body_limit, build, build_parser  # noqa: E402
from trimode.serve.engine import Engine, EngineConfig  # noqa: E402
from trimode.serve.fake import fake_api, fake_model  # noqa: E402
from trimode.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_tiny_vlm import IMG, make_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_TOKENS = 12
LIMITS = {"max_images": 2, "max_image_bytes": 20_000, "max_image_pixels": 5_000}  # small, to test them cheaply


def _img(h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _bytes(im, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def chat(*parts, max_tokens: int = MAX_TOKENS, mode: str = "linear", **extra) -> dict:
    return {"max_tokens": max_tokens, "decoding": {"mode": mode, "block_len": 4},
            "messages": [{"role": "user", "content": list(parts)}], **extra}


TEXT = {"type": "text", "text": "What is in this picture?"}
IM_A, IM_B, IM_WIDE = _img(30, 40, seed=1), _img(30, 40, seed=99), _img(20, 60, seed=2)  # 1200 pixels each
URL_A, URL_B, URL_WIDE = (data_url(_bytes(x)) for x in (IM_A, IM_B, IM_WIDE))


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return make_tiny_vlm(tmp_path_factory.mktemp("serve_vlm") / "vlm")


@pytest.fixture(scope="module")
def vlm(vlm_dir, one_thread):
    return trimode.load_model(vlm_dir), Tokenizer.from_dir(vlm_dir)


def make_client(model, tok, **settings) -> TestClient:
    base = {"model_name": "vlm", "context": model.config.max_seq_len, "vocab_size": model.config.vocab_size,
            "default_mode": "linear", **LIMITS}
    app = create_app(Engine(model, tok, EngineConfig()), tok, ServerSettings(**{**base, **settings}))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(vlm):
    with make_client(*vlm) as c:
        yield c


def reference(model, tok, messages: list[dict], images: list):
    """(expanded prompt, AR greedy tokens) of a chat with these images, decoded alone by generate."""
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    expanded, _ = embed_prompts(model, [ids], [images])
    g = trimode.generate(model, [ids], images=[images], mode="ar", max_new_tokens=MAX_TOKENS, eos_id=tok.eos_id)[0]
    return expanded[0], g.tokens


def assert_error(resp, status: int, *needles: str, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    for n in needles:
        assert n in err["message"], (n, err)
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_healthy(c: TestClient) -> None:
    h = c.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok", h.text
    t0 = time.time()
    while c.get("/health").json()["running"]:
        assert time.time() - t0 < 30
        time.sleep(0.02)
    h = c.get("/health").json()
    assert h["status"] == "ok" and h["queued"] == 0 and h["running"] == 0, h


# -- answers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["linear", "ar"])
def test_one_image_equals_ar_generate_with_the_image(client, vlm, mode):
    model, tok = vlm
    r = client.post("/v1/chat/completions", json=chat(image_part(URL_A, detail="high"), TEXT, mode=mode))
    assert r.status_code == 200, r.text
    b = r.json()
    expanded, want = reference(model, tok, [{"role": "user", "content": [{"type": "image"}, TEXT]}], [IM_A])
    assert b["decoding"]["mode"] == mode
    assert b["choices"][0]["message"]["content"] == tok.decode(want)
    assert b["usage"]["completion_tokens"] == len(want)
    assert b["usage"]["prompt_tokens"] == len(expanded)  # the image's token grid counts
    assert expanded.count(IMG) > 1

    # without the image: another (shorter) prompt; another image: another answer, equal to AR with it
    plain = client.post("/v1/chat/completions", json=chat(TEXT, mode=mode)).json()
    assert plain["usage"]["prompt_tokens"] < b["usage"]["prompt_tokens"]
    other = client.post("/v1/chat/completions", json=chat(image_part(URL_B), TEXT, mode=mode)).json()
    _, want_b = reference(model, tok, [{"role": "user", "content": [{"type": "image"}, TEXT]}], [IM_B])
    assert other["choices"][0]["message"]["content"] == tok.decode(want_b) != b["choices"][0]["message"]["content"]
    wide = client.post("/v1/chat/completions", json=chat(image_part(URL_WIDE), TEXT, mode=mode)).json()
    assert wide["usage"]["prompt_tokens"] != b["usage"]["prompt_tokens"]


def test_two_images_and_the_plain_string_image_url_form(client, vlm):
    model, tok = vlm
    parts = [{"type": "text", "text": "Compare"}, image_part(URL_A), {"type": "text", "text": "and"},
             {"type": "image_url", "image_url": URL_WIDE}]
    r = client.post("/v1/chat/completions", json=chat(*parts))
    assert r.status_code == 200, r.text
    b = r.json()
    template = [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"},
                {"type": "image"}]
    expanded, want = reference(model, tok, [{"role": "user", "content": template}], [IM_A, IM_WIDE])
    assert b["choices"][0]["message"]["content"] == tok.decode(want)
    assert b["usage"]["prompt_tokens"] == len(expanded)
    # the order of the images matters
    swapped = client.post("/v1/chat/completions", json=chat(parts[0], parts[3], parts[2], parts[1])).json()
    _, want_swapped = reference(model, tok, [{"role": "user", "content": template}], [IM_WIDE, IM_A])
    assert swapped["choices"][0]["message"]["content"] == tok.decode(want_swapped)


def test_a_large_image_is_scaled_down_as_generate_does(vlm):
    """An image over the vision tower's longest edge (64 here) is resized before encoding: the same
    pixels as trimode.generate gives it."""
    model, tok = vlm
    big = _img(90, 150, seed=5)
    with make_client(model, tok, max_image_bytes=10 * 1024 * 1024, max_image_pixels=40_000_000) as c:
        r = c.post("/v1/chat/completions", json=chat(TEXT, image_part(data_url(_bytes(big, "JPEG"), "image/jpeg"))))
    assert r.status_code == 200, r.text
    jpeg = Image.open(io.BytesIO(_bytes(big, "JPEG")))
    expanded, want = reference(model, tok, [{"role": "user", "content": [TEXT, {"type": "image"}]}], [jpeg])
    assert r.json()["choices"][0]["message"]["content"] == tok.decode(want)
    assert r.json()["usage"]["prompt_tokens"] == len(expanded)


def test_stream_with_an_image_equals_non_stream(client):
    body = chat(image_part(URL_A), TEXT)
    whole = client.post("/v1/chat/completions", json=body).json()
    r = client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == whole["usage"]


def test_images_beside_text_in_a_conversation(client, vlm):
    """A system message and an earlier assistant turn keep string content; the image goes where the
    user put it."""
    model, tok = vlm
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": [TEXT, image_part(URL_A)]}]
    r = client.post("/v1/chat/completions", json={"max_tokens": MAX_TOKENS, "messages": messages})
    assert r.status_code == 200, r.text
    template = messages[:3] + [{"role": "user", "content": [TEXT, {"type": "image"}]}]
    expanded, want = reference(model, tok, template, [IM_A])
    assert r.json()["choices"][0]["message"]["content"] == tok.decode(want)
    assert r.json()["usage"]["prompt_tokens"] == len(expanded)


# -- errors ----------------------------------------------------------------------------------------------
P0 = "messages.0.content.0.image_url"


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png", "file:///etc/passwd",
                                 "ftp://example.com/cat.png", "HTTPS://EXAMPLE.COM/X.PNG", "cat.png"])
def test_remote_urls_are_never_fetched(client, url):
    r = client.post("/v1/chat/completions", json=chat(image_part(url), TEXT))
    assert_error(r, 400, "never fetches remote URLs", param=P0, code="image_url_not_supported")


TIFF = _bytes(_img(8, 8), "TIFF")
PNG_HEAD = _bytes(IM_A)[:40]
BAD = [
    ("data:image/png,iVBORw0KGgo=", "must be base64-encoded"),
    ("data:image/png;base64,@@not base64@@", "invalid base64"),
    ("data:image/png;base64,", "empty"),
    ("data:text/plain;base64," + base64.b64encode(b"hello").decode(), "image/* media type"),
    (data_url(b"\x89PNG\r\n\x1a\n" + bytes(range(200))), "image data"),  # corrupt
    (data_url(PNG_HEAD), "image data"),  # truncated
    (data_url(b"GIF89a" + b"\x00" * 30, "image/gif"), "image data"),
    (data_url(TIFF, "image/tiff"), "not a supported format"),
    (data_url(b"just some text, not an image"), "not a supported format"),
]


@pytest.mark.parametrize("url,needle", BAD)
def test_bad_data_urls_and_images_are_named(client, url, needle):
    r = client.post("/v1/chat/completions", json=chat(TEXT, image_part(url)))
    err = assert_error(r, 400, needle, param="messages.0.content.1.image_url", code="invalid_image")
    assert err["message"].startswith("messages.0.content.1.image_url: ")


def test_image_limits(client):
    big = _bytes(_img(100, 100, seed=3))  # ~30 KB of noise: over the 20,000-byte limit
    assert len(big) > LIMITS["max_image_bytes"]
    assert_error(client.post("/v1/chat/completions", json=chat(image_part(data_url(big)))), 413,
                 "bytes", "limit of 20000", "--max-image-bytes", param=P0, code="image_too_large")
    flat = _bytes(Image.new("RGB", (100, 100), (200, 10, 10)))  # a few hundred bytes, 10,000 pixels
    assert len(flat) < LIMITS["max_image_bytes"]
    assert_error(client.post("/v1/chat/completions", json=chat(TEXT, image_part(data_url(flat)))), 400,
                 "100 x 100 pixels", "limit of 5000", "--max-image-pixels", param="messages.0.content.1.image_url",
                 code="image_too_many_pixels")
    three = [image_part(URL_A)] * 3
    assert_error(client.post("/v1/chat/completions", json=chat(*three, TEXT)), 400, "3 images", "limit of 2",
                 "--max-images", param="messages", code="too_many_images")
    across = {"max_tokens": 4, "messages": [{"role": "user", "content": [image_part(URL_A), image_part(URL_A)]},
                                            {"role": "assistant", "content": "ok"},
                                            {"role": "user", "content": [image_part(URL_A)]}]}
    assert_error(client.post("/v1/chat/completions", json=across), 400, "3 images", code="too_many_images")
    assert_healthy(client)


@pytest.mark.parametrize("role", ["system", "assistant", "developer"])
def test_images_only_in_user_messages(client, role):
    body = {"max_tokens": 4, "messages": [{"role": role, "content": [TEXT, image_part(URL_A)]},
                                          {"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=body), 400, "user messages only",
                 param="messages.0.content.1")


@pytest.mark.parametrize("part,param", [
    ({"type": "image_url", "image_url": {"url": URL_A, "extra": 1}}, "messages.0.content.0.image_url.extra"),
    ({"type": "image_url", "image_url": {"url": URL_A, "detail": "ultra"}}, "messages.0.content.0.image_url.detail"),
    ({"type": "image_url", "image_url": {"detail": "low"}}, "messages.0.content.0.image_url.url"),
    ({"type": "image_url", "image_url": 5}, "messages.0.content.0.image_url"),
    ({"type": "image_url"}, "messages.0.content.0.image_url"),
    ({"type": "image_url", "image_url": URL_A, "extra": 1}, "messages.0.content.0.extra"),
    ({"type": "image", "image": URL_A}, "messages.0.content.0"),
    ({"type": "input_audio", "input_audio": {}}, "messages.0.content.0"),
])
def test_malformed_parts_are_named(client, part, param):
    assert_error(client.post("/v1/chat/completions", json=chat(part)), 400, param, param=param)


def test_images_to_a_text_only_model(tmp_path):
    from trimode.cli import BUNDLED
    from trimode.tokenizer import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    engine = Engine(fake_model(tok.vocab_size), tok, EngineConfig(), api=fake_api(tok))
    app = create_app(engine, tok, ServerSettings(model_name="fake", context=1024, vocab_size=tok.vocab_size))
    with TestClient(app, raise_server_exceptions=False) as c:
        for url in (URL_A, "https://example.com/x.png", "data:garbage"):
            assert_error(c.post("/v1/chat/completions", json=chat(TEXT, image_part(url), mode="ar")), 400,
                         "text-only", param="messages.0.content.1.image_url", code="images_not_supported")
        ok = c.post("/v1/chat/completions", json=chat(TEXT, mode="ar"))
        assert ok.status_code == 200, ok.text
        assert c.get("/health").json()["status"] == "ok"


def test_the_template_must_place_every_image(vlm):
    import copy

    model, tok = vlm
    blind = copy.copy(tok)  # a template that drops image parts
    blind.chat_template = ("{{ bos_token }}{% for m in messages %}[INST]{% if m.content is string %}{{ m.content }}"
                           "{% else %}{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% endif %}"
                           "{% endfor %}{% endif %}[/INST]{% endfor %}")
    with make_client(model, blind) as c:
        assert_error(c.post("/v1/chat/completions", json=chat(image_part(URL_A), TEXT)), 400,
                     "chat template did not place the 1 image(s)", param="messages", code="invalid_image_tokens")
        assert c.post("/v1/chat/completions", json=chat(TEXT)).status_code == 200


def test_image_tokens_without_images_are_refused(client):
    """Typed into a chat message, [IMG] is text; in a completion prompt (text or ids) it would be an image
    slot without an image."""
    r = client.post("/v1/chat/completions", json=chat({"type": "text", "text": "what is [IMG]?"}))
    assert r.status_code == 200, r.text
    for prompt in ("look: [IMG] here", [1, 3, IMG, 4]):
        assert_error(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}), 400,
                     "/v1/completions takes no images", param="prompt", code="invalid_image_tokens")
    assert client.post("/v1/completions", json={"prompt": "a red square", "max_tokens": 4}).status_code == 200


def test_the_prompt_limit_counts_the_image_tokens(vlm):
    """A prompt that is short as text but long with its image's grid is refused before the tower runs."""
    model, tok = vlm
    with make_client(model, tok, max_prompt_tokens=30) as c:
        assert c.post("/v1/chat/completions", json=chat(TEXT)).status_code == 200
        err = assert_error(c.post("/v1/chat/completions", json=chat(image_part(URL_A), TEXT)), 400,
                           "more than the limit of 30", code="context_length_exceeded")
        assert err["param"] == "prompt"
        assert_error(c.post("/v1/chat/completions", json=chat(image_part(URL_A), TEXT, max_tokens=2040)), 400)


def test_the_body_limit_admits_max_images_of_max_bytes(vlm):
    """With the default body limit of a VLM, max_images images of max_image_bytes each fit (they reach the
    image checks: this noise is no image, so 400, not 413); one byte more body is a 413."""
    model, tok = vlm
    limit = body_limit(LIMITS["max_images"], LIMITS["max_image_bytes"])
    noise = os.urandom(LIMITS["max_image_bytes"])
    body = chat(*[image_part(data_url(noise))] * LIMITS["max_images"], TEXT)
    with make_client(model, tok, max_body_bytes=limit) as c:
        assert len(json.dumps(body)) < limit
        assert_error(c.post("/v1/chat/completions", json=body), 400, "not a supported format", code="invalid_image")
    with make_client(model, tok, max_body_bytes=len(json.dumps(body).encode()) - 1) as c:
        raw = json.dumps(body).encode()
        r = c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert_error(r, 413, "exceeds the limit", code="body_too_large")


def test_cli_flags_and_the_vlm_body_limit(vlm_dir):
    def settings(*extra):
        args = build_parser().parse_args(["--model", str(vlm_dir), "--max-cycle-tokens", "256", *extra])
        app, engine, s, _ = build(args)
        return s

    s = settings()
    assert (s.max_images, s.max_image_bytes, s.max_image_pixels) == (8, 10 * 1024 * 1024, 40_000_000)
    assert s.max_body_bytes == body_limit(8, 10 * 1024 * 1024) > 8 * 4 * (10 * 1024 * 1024) // 3
    s = settings("--max-images", "2", "--max-image-bytes", "1000", "--max-image-pixels", "500")
    assert (s.max_images, s.max_image_bytes, s.max_image_pixels) == (2, 1000, 500)
    assert s.max_body_bytes == body_limit(2, 1000) and s.image_limits.max_pixels == 500
    assert settings("--max-body-bytes", "5000").max_body_bytes == 5000
    assert TEXT_BODY_BYTES == 1 << 20
    for bad in (["--max-images", "0"], ["--max-image-bytes", "0"], ["--max-image-pixels", "-1"],
                ["--max-body-bytes", "0"]):
        with pytest.raises(ValueError, match=bad[0]):
            settings(*bad)


def test_health_after_the_bad_requests(client):
    """Last in the module: after every bad request above, the server is healthy and idle."""
    assert_healthy(client)
    r = client.post("/v1/chat/completions", json=chat(image_part(URL_A), TEXT))
    assert r.status_code == 200, r.text
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics


# -- end to end ----------------------------------------------------------------------------------------
def test_openai_client_against_trimode_serve_with_a_base64_data_url(vlm_dir, vlm):
    """The same through the real openai client against `trimode serve --model DIR` (a base64 data URL)."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    model, tok = vlm
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimode.cli", "serve", "--model", str(vlm_dir), "--port", str(port), "--threads", "1",
         "--block-len", "4"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < 120, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        (card,) = client.models.list().data
        content = [{"type": "image_url", "image_url": {"url": URL_A, "detail": "auto"}}, TEXT]
        r = client.chat.completions.create(model=card.id, messages=[{"role": "user", "content": content}],
                                           max_tokens=MAX_TOKENS)
        expanded, want = reference(model, tok, [{"role": "user", "content": [{"type": "image"}, TEXT]}], [IM_A])
        assert r.choices[0].message.content == tok.decode(want)
        assert r.usage.prompt_tokens == len(expanded) and r.usage.completion_tokens == len(want)
        assert r.model_extra["decoding"]["requested"] == "auto"
        chunks = list(client.chat.completions.create(model=card.id, messages=[{"role": "user", "content": content}],
                                                     max_tokens=MAX_TOKENS, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="never fetches remote URLs"):
            client.chat.completions.create(model=card.id, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, TEXT]}])
        with pytest.raises(openai.BadRequestError, match="image data"):
            client.chat.completions.create(model=card.id, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(PNG_HEAD)}}]}])
        # a full-size request body (the default limit of a VLM admits 8 images of 10 MiB; one of 3 MB here)
        big = data_url(os.urandom(3_000_000))
        with pytest.raises(openai.BadRequestError, match="not a supported format"):
            client.chat.completions.create(model=card.id, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": big}}]}])
        assert httpx.get(url + "/health").json()["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert "images (data: URLs only): up to 8 per chat request" in out, out
