"""Tokenizer: special ids by name, chat templates, UTF-8-safe streaming, model checks, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from trimode.config import ModelConfig
from trimode.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CORPUS = ["hello world", "héllo 世界 🙂", "the quick brown fox jumps", "naïve café ünïcödé", "数学 😀 🙂 👍🏽"]
# ChatML with think tags, written the way hub templates are (block tags on their own lines), so
# the rendering depends on trim_blocks / lstrip_blocks exactly as in transformers.
CHATML = """{%- if messages[0].role != 'system' %}
<|im_start|>system
<|im_end|>
{% endif %}
{% for m in messages %}
{% if m.role not in ['system', 'user', 'assistant'] %}
{{ raise_exception('unknown role ' + m.role) }}
{% endif %}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking | default(false) %}
<think>
{% else %}
<think></think>
{%- endif %}
{% endif %}"""


def _backend() -> HFTokenizer:
    """A byte-level BPE trained on a few multi-byte strings, so characters split across tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    _backend().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<pad>",
        "chat_template": CHATML,
    }))
    (path / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>", "eos_token": "</s>"}))
    return path


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    t = load_tokenizer(tok_dir)
    assert t is not None
    return t


def test_encode_decode(tok: Tokenizer) -> None:
    for text in CORPUS + ["unseen: ∑ ✓ 🦀"]:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text
    assert tok.vocab_size == tok.backend.get_vocab_size()


def test_special_ids_by_name(tok: Tokenizer) -> None:
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    assert tok.bos_id == ids["<s>"]
    assert tok.eos_id == ids["<|im_end|>"]  # tokenizer_config.json wins over special_tokens_map.json
    assert tok.pad_id == ids["<pad>"]
    assert tok.unk_id == ids["<unk>"]
    assert tok.mask_id == ids["<|mask|>"]  # found by its spelling: no file names it
    assert tok.special_tokens["eos"] == "<|im_end|>"


def test_special_ids_from_model_config(tmp_path: Path) -> None:
    """ids in config.json / generation_config.json fill in what the tokenizer files do not name."""
    backend = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "[MASK]": 3, "<eos>": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_dir(tmp_path).mask_id == 3  # "[MASK]" spelling
    (tmp_path / "config.json").write_text(json.dumps({"mask_token_id": 2, "bos_token_id": 1}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))
    t = Tokenizer.from_dir(tmp_path)
    assert (t.mask_id, t.bos_id, t.eos_id, t.pad_id) == (2, 1, 4, None)
    assert t.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "a"}])


def test_chat_template(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi 🙂"}]
    want = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs) == want + "<think></think>"
    assert tok.apply_chat_template(msgs, enable_thinking=True) == want + "<think>\n"
    no_prompt = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
    with_system = [{"role": "system", "content": "Be brief."}, *msgs]
    assert tok.apply_chat_template(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    # The rendered prompt tokenises with the special tokens intact.
    ids = tok.encode(want)
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.eos_id in ids
    with pytest.raises(ValueError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="must be a dict with a 'role'"):
        tok.apply_chat_template(["hello"])  # type: ignore[list-item]


def test_template_helpers_and_sandbox(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "x"}]
    t = "{{ bos_token }}{{ {'a': '<b>&'} | tojson }}|{{ strftime_now('%Y') | length }}|{{ eos_token }}"
    assert tok.apply_chat_template(msgs, chat_template=t) == '<s>{"a": "<b>&"}|4|<|im_end|>'
    gen = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    assert tok.apply_chat_template(msgs, chat_template=gen) == "[x]"
    with pytest.raises(ValueError, match="failed to render"):
        tok.apply_chat_template(msgs, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="does not parse"):
        tok.apply_chat_template(msgs, chat_template="{% for %}")


def test_template_sources(tok_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "DEFAULT"
    (tmp_path / "chat_template.jinja").write_text("JINJA {{ messages | length }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "JINJA 0"  # the .jinja file wins
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(ValueError, match="without a 'default'"):
        Tokenizer.from_dir(tmp_path)


def _stream_pieces(tok: Tokenizer, ids: list[int], step: int) -> list[str]:
    sd = StreamDecoder(tok)
    pieces = [sd.feed(ids[i:i + step]) for i in range(0, len(ids), step)]
    pieces.append(sd.flush())
    return pieces


@pytest.mark.parametrize("step", [1, 2, 3])
def test_stream_decoder_multibyte(tok: Tokenizer, step: int) -> None:
    text = "héllo 世界 🙂 数学 👍🏽 ünïcödé ∑ done"
    ids = tok.encode(text)
    # The test is only meaningful if some token ends mid-character.
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))
    pieces = _stream_pieces(tok, ids, step)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_single_ids_and_flush(tok: Tokenizer) -> None:
    ids = tok.encode("a🦀")  # 🦀 is unseen in training: four single-byte tokens
    sd = tok.stream()
    out = [sd.feed(i) for i in ids[:-1]]
    assert "".join(out) == "a" and all("\ufffd" not in p for p in out)
    assert sd.flush() == "\ufffd"  # generation stopped mid-character: flush owns up to it
    sd = tok.stream()
    assert sd.feed(ids) == "a🦀" and sd.flush() == ""


def test_stream_decoder_keeps_sentencepiece_spaces() -> None:
    """Decoders that strip a leading space per call must not lose spaces between streamed pieces."""
    backend = HFTokenizer(models.WordLevel({"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    t = Tokenizer(backend)
    ids = [1, 2, 3]
    assert [t.decode([i]) for i in ids] == ["hello", "world", "!"]  # naive per-id decoding loses the space
    assert "".join(_stream_pieces(t, ids, 1)) == t.decode(ids) == "hello world!"


def test_check_model(tok: Tokenizer) -> None:
    n = tok.vocab_size
    ok = ModelConfig(vocab_size=n + 64, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                     num_kv_heads=1, head_dim=8, mask_token_id=tok.mask_id, eos_token_id=tok.eos_id)
    tok.check_model(ok)  # a padded embedding is fine
    with pytest.raises(ValueError, match=f"tokenizer has {n} tokens but the model's vocab_size is {n - 1}"):
        tok.check_model(ok.replace(vocab_size=n - 1, mask_token_id=1, eos_token_id=2))
    with pytest.raises(ValueError, match=f"mask_token_id={n + 3} is not a token"):
        tok.check_model(ok.replace(mask_token_id=n + 3))
    with pytest.raises(ValueError, match=f"eos_token_id={n} is not a token"):
        tok.check_model(ok.replace(eos_token_id=n))


def test_save_round_trip(tok: Tokenizer, tok_dir: Path, tmp_path: Path) -> None:
    tok.save(tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tok_dir / name).read_bytes()
    back = load_tokenizer(tmp_path / "out")
    assert back is not None and back.eos_id == tok.eos_id and back.chat_template == tok.chat_template
    # Built in memory: save writes tokenizer.json and a tokenizer_config.json from the fields.
    fresh = Tokenizer(_backend(), special_tokens={"eos": "</s>"}, chat_template="T")
    fresh.save(tmp_path / "fresh")
    again = Tokenizer.from_dir(tmp_path / "fresh")
    assert again.eos_id == fresh.eos_id and again.chat_template == "T"
    assert again.encode("héllo") == fresh.encode("héllo")
    assert load_tokenizer(tmp_path) is None  # no tokenizer.json there
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_tokenizer(tmp_path / "bad")


def test_chat_template_matches_transformers(tok: Tokenizer) -> None:
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo"}],
    ]
    for msgs in convs:
        for kw in ({"add_generation_prompt": True}, {"add_generation_prompt": False},
                   {"add_generation_prompt": True, "enable_thinking": True}):
            want = utils.render_jinja_template([msgs], chat_template=CHATML, **kw)[0][0]
            assert tok.apply_chat_template(msgs, **kw) == want


def test_check_model_refuses_another_models_tokenizer(tok: Tokenizer) -> None:
    """A 3-token (or any far smaller) tokenizer beside a big embedding is another model's: every id it
    produces would be a wrong token, silently. A padded vocabulary (a few percent) stays fine."""
    n = tok.vocab_size
    big = ModelConfig(vocab_size=4 * n, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="another model's tokenizer"):
        tok.check_model(big)
    tok.check_model(big.replace(vocab_size=n + n // 8))
