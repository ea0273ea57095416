"""`trimode serve --model DIR`: the OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from ..models import BLOCK_LEN_HELP, DEFAULT_BLOCK_LEN
from ..modes import MODE_NAMES, SPECULATIVE_MODES

# "auto" runs speculative decoding while running + queued requests <= the crossover. Without a
# measurement (serving.json, written by `trimode bench --write-crossover`) we assume 8: speculation
# pays while a forward is memory-bound, and batches of a handful of rows already fill a small device.
FALLBACK_CROSSOVER = 8
FALLBACK_BLOCK_LEN = DEFAULT_BLOCK_LEN  # one default for every command (trimode.models.default_block_len)
SERVING_JSON = "serving.json"
TEXT_BODY_BYTES = 1 << 20  # the request body limit of a text-only model


def body_limit(max_images: int, max_image_bytes: int) -> int:
    """The default body limit of a vision-language model: max_images images of max_image_bytes each as
    base64 data: URLs (4 characters per 3 bytes, plus the URL's head), plus 1 MiB for the rest."""
    per_image = 4 * -(-max_image_bytes // 3) + 64
    return max_images * per_image + TEXT_BODY_BYTES


def model_dir(name: str) -> Path:
    """A checkpoint directory, or a named model (`bundled`, `smollm2`: see trimode.models)."""
    from ..models import resolve_model

    return resolve_model(name)


def read_serving(path: Path) -> tuple[dict, str]:
    """DIR/serving.json as written by `trimode bench --sweep --write-crossover`: auto_crossover (required),
    speculative_mode and block_len (the configuration the crossover was measured with; optional).
    Returns ({} , reason) when there is no file."""
    f = path / SERVING_JSON
    if not f.is_file():
        return {}, f"fallback (no {SERVING_JSON})"
    try:
        data = json.loads(f.read_text())
        value = data["auto_crossover"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: expected {{\"auto_crossover\": N, ...}}: {e!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{f}: auto_crossover must be a non-negative integer, got {value!r}")
    out = {"auto_crossover": value}
    if data.get("speculative_mode") in SPECULATIVE_MODES:
        out["speculative_mode"] = data["speculative_mode"]
    bl = data.get("block_len")
    if isinstance(bl, int) and not isinstance(bl, bool) and bl >= 1:
        out["block_len"] = bl
    return out, str(f)


def read_crossover(path: Path) -> tuple[int, str]:
    """The auto crossover from DIR/serving.json, or the fallback; returns (value, where it came from)."""
    data, source = read_serving(path)
    return data.get("auto_crossover", FALLBACK_CROSSOVER), source


class _Help(argparse.HelpFormatter):
    """Show a flag's default unless its help already explains it (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "default" in h.lower() or action.default in (None, False, argparse.SUPPRESS):
            return h
        return f"{h} (default: %(default)s)" if h else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trimode serve", formatter_class=_Help,
        description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /health, "
                    "/metrics) with continuous batching and load-aware decoding-mode selection.")
    p.add_argument("--model", required=True, help="checkpoint directory (native, NLD or HF), 'smollm2' or 'bundled'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="port to bind")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory "
                                                             "name, 'bundled' for the bundled model)")
    g = p.add_argument_group("decoding defaults (a request's \"decoding\" field overrides them)")
    g.add_argument("--mode", default="auto", choices=["auto", *MODE_NAMES],
                   help="decoding mode of requests that do not name one")
    g.add_argument("--spec-mode", default=None, choices=list(SPECULATIVE_MODES),
                   help=f"the speculative mode 'auto' uses at low load. Default: speculative_mode from "
                        f"DIR/{SERVING_JSON}, else speculative_mode from DIR/decoding.json, else linear")
    g.add_argument("--auto-crossover", type=int, default=None,
                   help=f"'auto' decodes speculatively while running + queued requests <= N, AR above. Default: "
                        f"auto_crossover from DIR/{SERVING_JSON} (trimode bench --write-crossover), else "
                        f"{FALLBACK_CROSSOVER}")
    g.add_argument("--block-len", type=int, default=None,
                   help=f"{BLOCK_LEN_HELP}, as trimode generate and demo (given: every mode's)")
    g.add_argument("--threshold", type=float, default=0.9, help="diffusion confidence threshold")
    g.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens when a request omits it (capped by the context left)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context - 1")
    lim.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    lim.add_argument("--max-running", type=int, default=64, help="requests decoded at once (the batch)")
    lim.add_argument("--max-queue", type=int, default=256,
                     help="requests waiting for a slot; beyond it: 429 with Retry-After")
    lim.add_argument("--max-block-len", type=int, default=64, help="largest decoding.block_len a request may ask")
    lim.add_argument("--max-cycle-tokens", type=int, default=None,
                     help="tokens a decoder may put through one forward (rows x forward width; quadratic k "
                          "is k(k+1) per row): bounds what one request costs everyone; wider requests get "
                          "400. Default: measured at start-up, the widest forward that costs at most "
                          "--max-cycle-cost AR steps on this model and machine")
    lim.add_argument("--max-cycle-cost", type=float, default=6.0,
                     help="the start-up measurement's budget: a cycle may cost this many AR steps")
    lim.add_argument("--max-decoders", type=int, default=8,
                     help="distinct decoding configs (mode, block_len, threshold) run at once; others queue")
    lim.add_argument("--request-timeout", type=float, default=300.0,
                     help="seconds from arrival to the last token; then 408 (or an error event in a stream)")
    lim.add_argument("--max-body-bytes", type=int, default=None,
                     help=f"larger request bodies get 413. Default: {TEXT_BODY_BYTES} (1 MiB) for a text-only model; "
                          "for a vision-language model enough for --max-images images of --max-image-bytes each, "
                          "base64-encoded, plus 1 MiB (8 x 10 MiB: 112897216). Given, it caps the whole body, "
                          "images included")
    lim.add_argument("--max-images", type=int, default=8,
                     help="images per chat request (vision-language models); more get 400")
    lim.add_argument("--max-image-bytes", type=int, default=10 * 1024 * 1024,
                     help="encoded bytes of one image (after base64 decoding); larger gets 413")
    lim.add_argument("--max-image-pixels", type=int, default=40_000_000,
                     help="width x height of one decoded image, checked before its pixels are decoded; larger "
                          "gets 400")
    lim.add_argument("--shutdown-grace", type=float, default=30.0,
                     help="seconds in-flight requests get after SIGTERM / SIGINT (new ones get 503); then the "
                          "rest end with a clean 503 and the server exits 0")
    lim.add_argument("--keep-alive-timeout", type=float, default=5.0, help="idle keep-alive connections close after")
    lim.add_argument("--max-connections", type=int, default=512,
                     help="open connections at once; beyond it new ones get 503 (uvicorn limit_concurrency)")
    lim.add_argument("--max-header-bytes", type=int, default=16384, help="request line + headers larger get 400")
    lim.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection may take to send a request's line and headers (from opening, "
                          "or from the end of the previous response); then it is closed (408 if it had begun)")
    lim.add_argument("--body-timeout", type=float, default=30.0,
                     help="seconds from a request's headers to the end of its body; a stalled upload gets 408")
    sec = p.add_argument_group("access")
    sec.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                          "$TRIMODE_API_KEY; '' for none)")
    sec.add_argument("--allowed-hosts", default="",
                     help="comma-separated Host names accepted besides localhost / 127.0.0.1 / ::1 and --host; "
                          "'*' accepts any (protects a local server from DNS-rebinding web pages)")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--dtype", default=None,
                    help="float32 | bfloat16 | float64 | auto (fastest here) (default: as stored)")
    from ..cli import COMPILE_HELP, FEATURE_DRAFTER_HELP, FULL_DRAFT_VOCAB_HELP, QUANTIZE_CHOICES, QUANTIZE_HELP

    rt.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    rt.add_argument("--full-draft-vocab", action="store_true", help=FULL_DRAFT_VOCAB_HELP)
    rt.add_argument("--feature-drafter", default=None, help=FEATURE_DRAFTER_HELP)
    rt.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    rt.add_argument("--device", default="cpu", help="torch device of the model")
    rt.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    rt.add_argument("--fake-decoder", action="store_true",
                    help="serve a model-free scripted decoder (tests and load tests of the HTTP layer only)")
    rt.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                    help="server log level")
    return p


def build(args: argparse.Namespace):
    """Load the model and tokenizer and build (app, engine, settings) from parsed flags."""
    import torch

    from ..checkpoint import load_model
    from ..cli import _dtype
    from ..tokenizer import load_tokenizer
    from .app import ServerSettings, create_app
    from .engine import Engine, EngineConfig
    from .guard import allowed_hosts_for

    path = model_dir(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    serving, source = read_serving(path)
    crossover = serving.get("auto_crossover", FALLBACK_CROSSOVER)
    if args.auto_crossover is not None:
        crossover, source = args.auto_crossover, "--auto-crossover"
    explicit_block_len = args.block_len is not None
    if args.block_len is None:
        args.block_len = serving.get("block_len", FALLBACK_BLOCK_LEN)
    if args.spec_mode is None:
        args.spec_mode = serving.get("speculative_mode")
    for name in ("max_running", "max_tokens_limit", "default_max_tokens", "max_block_len", "block_len",
                 "max_decoders", "max_images", "max_image_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if args.max_cycle_tokens is not None and args.max_cycle_tokens < 1:
        raise ValueError(f"--max-cycle-tokens must be >= 1, got {args.max_cycle_tokens}")
    if not args.max_cycle_cost >= 1:
        raise ValueError(f"--max-cycle-cost must be >= 1 (AR steps), got {args.max_cycle_cost}")
    if args.request_timeout <= 0:
        raise ValueError(f"--request-timeout must be > 0, got {args.request_timeout}")
    for name in ("shutdown_grace", "keep_alive_timeout", "header_timeout", "body_timeout"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("max_connections", "max_header_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from ..models import for_inference

    model = for_inference(load_model(path, dtype=_dtype(args.dtype, args.device), device=args.device,
                                     quantize=args.quantize), draft_vocab=not args.full_draft_vocab,
                          feature_drafter=args.feature_drafter)
    tok = load_tokenizer(path)
    if tok is None:
        raise ValueError(f"{path} has no tokenizer.json; the server needs one")
    tok.check_model(model.config)
    c = model.config
    from ..models import NAMES, default_block_len

    if args.spec_mode is None:  # the model's measured faster speculative mode (decoding.json), else linear
        args.spec_mode = model.decoding.get("speculative_mode", "linear")

    # Without --block-len each mode uses the block length measured best for this model (decoding.json).
    block_lens = {} if explicit_block_len else {
        m: default_block_len(model, m, path) for m in MODE_NAMES if m != "ar"}
    if block_lens:
        block_lens["auto"] = block_lens[args.spec_mode]
    vision = getattr(model, "vision", None) is not None
    max_body_bytes = args.max_body_bytes
    if max_body_bytes is None:
        max_body_bytes = body_limit(args.max_images, args.max_image_bytes) if vision else TEXT_BODY_BYTES
    settings = ServerSettings(
        model_name=args.served_model_name or (args.model if args.model in NAMES else path.name),
        context=c.max_seq_len, vocab_size=c.vocab_size,
        has_mask=c.mask_token_id is not None, default_mode=args.mode, default_block_len=args.block_len,
        block_lens=block_lens, default_threshold=args.threshold, default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
        max_block_len=args.max_block_len, request_timeout=args.request_timeout, max_body_bytes=max_body_bytes,
        body_timeout=args.body_timeout, max_images=args.max_images, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        api_key=(args.api_key if args.api_key is not None else os.environ.get("TRIMODE_API_KEY")) or None,
        allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts.split(",")))
    if args.mode not in ("ar", "auto") and not settings.has_mask:
        raise ValueError(f"--mode {args.mode} needs a mask token, which this model has not")
    cycle_source = "--max-cycle-tokens"
    if args.max_cycle_tokens is None:
        from .calibrate import max_cycle_tokens
        from .engine import forward_width

        # The server's own defaults must always be admitted, whatever the measurement says.
        floor = max(forward_width(m, block_lens.get(m, args.block_len))
                    for m in MODE_NAMES if m == "ar" or settings.has_mask)
        args.max_cycle_tokens, measured = max_cycle_tokens(model, args.max_cycle_cost, floor=floor)
        cycle_source = (f"measured: <= {args.max_cycle_cost:g} AR steps of {measured['ar_step_ms']:g} ms; "
                        f"cost by width {measured['cost_in_ar_steps']}")
    if args.compile:  # after the measurement (eager: a conservative budget); graphs compile on first use
        model.compile_decode()
    api = None
    if args.fake_decoder:
        from .fake import fake_api

        api = fake_api(tok)
    engine = Engine(model, tok, EngineConfig(max_running=args.max_running, max_queue=args.max_queue,
                                             spec_mode=args.spec_mode, auto_crossover=crossover,
                                             default_max_tokens=args.max_tokens_limit,
                                             max_cycle_tokens=args.max_cycle_tokens,
                                             max_decoders=args.max_decoders), api=api)
    engine.cycle_source = cycle_source
    return create_app(engine, tok, settings), engine, settings, source


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError as e:
        print(f"trimode serve: needs the serve extra (pip install 'trimode[serve]'): {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app, engine, settings, source = build(args)
    except ValueError as e:
        print(f"trimode serve: error: {e}", file=sys.stderr)
        return 2
    cfg = engine.config
    print(f"trimode serve: model {settings.model_name!r} ({args.model}), mode {args.mode}, auto: "
          f"{cfg.spec_mode} while load <= {cfg.auto_crossover} ({source}), else ar; "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    print(f"trimode serve: at most {cfg.max_cycle_tokens} tokens per forward ({engine.cycle_source})",
          file=sys.stderr, flush=True)
    if getattr(engine.model, "vision", None) is not None:
        print(f"trimode serve: images (data: URLs only): up to {settings.max_images} per chat request, "
              f"{settings.max_image_bytes} bytes and {settings.max_image_pixels} pixels each; request bodies up to "
              f"{settings.max_body_bytes} bytes", file=sys.stderr, flush=True)
    if getattr(engine.model, "quantization", None):
        from ..cli import describe_quantization

        print(f"trimode serve: quantized: {describe_quantization(engine.model)}", file=sys.stderr, flush=True)
    class DrainingServer(uvicorn.Server):
        """On SIGTERM / SIGINT the engine stops taking requests and gives the in-flight ones the grace
        period (less a second to send their answers), then uvicorn closes the connections."""

        def handle_exit(self, sig, frame) -> None:
            engine.drain(max(0.0, args.shutdown_grace - 1.0))
            super().handle_exit(sig, frame)

    from .protocol import guarded_protocol

    max_connections = _fit_descriptor_limit(args.max_connections)
    logging.getLogger("asyncio").addFilter(_OncePer("out of system resource"))
    logging.getLogger("uvicorn.error").addFilter(_OncePer("Invalid HTTP request"))
    # Idle connections beyond the cap are evicted by the protocol (oldest first); uvicorn's own limit
    # (503 for a request) only bites when every connection is busy.
    server = DrainingServer(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, backlog=BACKLOG,
        http=guarded_protocol(args.header_timeout, max_connections),
        timeout_graceful_shutdown=args.shutdown_grace, timeout_keep_alive=args.keep_alive_timeout,
        limit_concurrency=max_connections + 1, h11_max_incomplete_event_size=args.max_header_bytes))
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal: make both a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 1


BACKLOG = 128  # connections the kernel queues for accept(); asyncio accepts up to this many per wake-up


class _OncePer:
    """A logging filter that lets a message through at most once per `seconds`, with a count of the
    ones it held back. Clients control how often some messages are logged (asyncio logs every failed
    accept() of a burst when the open-files limit is hit; uvicorn one warning per malformed request):
    without this a client could grow the log as fast as it can send garbage."""

    def __init__(self, needle: str, seconds: float = 10.0) -> None:
        self.needle, self.seconds, self.last, self.held = needle, seconds, float("-inf"), 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.needle not in str(record.msg):
            return True
        import time

        now = time.monotonic()
        if now - self.last < self.seconds:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.msg} (and {self.held} more in the last {now - self.last:.0f} s)"
            record.exc_info = record.exc_text = None
        self.last, self.held = now, 0
        return True


def _fit_descriptor_limit(max_connections: int, reserve: int = BACKLOG + 64) -> int:
    """Raise the soft open-files limit towards the hard one so that max_connections sockets fit beside
    the model's and the server's own files; when they cannot, lower the cap (and say so) rather than
    letting accept() fail with EMFILE, which makes every new connection, /health included, hang."""
    try:
        import resource
    except ImportError:  # not POSIX
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + reserve
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        fit = max(1, soft - reserve)
        print(f"trimode serve: warning: the open-files limit is {soft}; --max-connections lowered from "
              f"{max_connections} to {fit}", file=sys.stderr, flush=True)
        return fit
    return max_connections


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
