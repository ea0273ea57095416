"""Sandboxed jinja rendering of Hugging Face chat templates.

Chat templates ship inside downloaded checkpoints, so they are untrusted code: they run in jinja's
immutable sandbox, with a budget of loop iterations, output size and value sizes. The environment
mirrors what `transformers` gives templates (trim_blocks, lstrip_blocks, loop controls, a
non-escaping `tojson`, `raise_exception`, `strftime_now`, and the `{% generation %}` tag, rendered as
its body) so templates written for it render identically here.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    # Templates call this to reject malformed conversations (e.g. roles out of order).
    raise ValueError(f"chat template error: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes '<', '>', '&', which would corrupt tool schemas in prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we only render it."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


# A render's budget: a template is code from a downloaded file, so besides the sandbox (no attribute
# access to internals, no mutation) it gets bounded work and output.
MAX_ITERATIONS = 1_000_000  # items all range() loops of one render may produce together
MAX_OUTPUT = 1 << 22  # characters of rendered prompt
MAX_VALUE = 1 << 20  # length of a string or list a `*` / `**` in the template may build


class _Env(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise ValueError(f"chat template computes {left!r:.20} ** {right}: too large")
        if operator == "*":
            for a, b in ((left, right), (right, left)):
                if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * b > MAX_VALUE:
                    raise ValueError(f"chat template builds a value of {len(a) * b} items (limit {MAX_VALUE})")
        return super().call_binop(context, operator, left, right)


def _budgeted_range(budget: list[int]):
    def range_(*args: int):
        for x in range(*args):
            budget[0] -= 1
            if budget[0] < 0:
                raise ValueError(f"chat template ran more than {MAX_ITERATIONS} loop iterations")
            yield x

    return range_


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from None


def render(template: str, **context: Any) -> str:
    """Render `template` with `context` (messages, add_generation_prompt, special tokens, extras),
    within the budget above. Every failure of the template is a ValueError."""
    compiled = _compile(template)
    out: list[str] = []
    size = 0
    try:
        for chunk in compiled.generate(**context, range=_budgeted_range([MAX_ITERATIONS])):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise ValueError(f"chat template renders more than {MAX_OUTPUT} characters")
            out.append(chunk)
    except ValueError:
        raise
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from None
    except RecursionError:
        raise ValueError("chat template failed to render: it recurses too deeply") from None
    except Exception as e:  # noqa: BLE001 (1/0, include without a loader, type errors: the template's fault)
        raise ValueError(f"chat template failed to render: {type(e).__name__}: {e}"[:300]) from None
    return "".join(out)
