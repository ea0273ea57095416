"""A chat template is code from a downloaded file: hostile ones end in a ValueError, quickly."""

from __future__ import annotations

import time

import pytest

from trimode._chat_template import render

MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template,match", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iterations"),
    ("{{ 'x' * 100000000 }}", "builds a value"),
    ("{{ 2 ** 100000 }}", "too large"),
    ("{% for i in range(100000) %}{{ 'abcdefghij' * 100 }}{% endfor %}", "characters|loop iterations"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% include 'other.jinja' %}", "failed to render"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses|failed to render"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),  # the sandbox itself
])
def test_hostile_templates_fail_fast(template, match):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        render(template, messages=MSGS)
    assert time.perf_counter() - t0 < 5


def test_ordinary_templates_still_render():
    tpl = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
           "{% endfor %}{% for i in range(3) %}.{% endfor %}")
    assert render(tpl, messages=MSGS * 2) == "<|user|>hi\n<|user|>hi..."
