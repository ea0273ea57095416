"""Hugging Face `tokenizer.json` + jinja chat template, special ids by name, UTF-8-safe streaming.

`Tokenizer` wraps a `tokenizers.Tokenizer` with what generation needs: the bos / eos / pad / mask ids
(resolved from token *names* in the tokenizer files, so no id is hard-coded), the chat template
rendered in a sandbox the way `transformers` renders it, and `save` so a checkpoint directory keeps
its tokenizer files verbatim. `StreamDecoder` turns ids into text as they arrive without ever
emitting half of a multi-byte character.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from ._io import read_json
from .config import ModelConfig

# Files that travel with the tokenizer. They are copied byte for byte on save, so whatever fields we do
# not interpret (padding side, added-token flags, generation defaults) survive a round trip.
AUX_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
# Spellings of the diffusion [MASK] token we look for when no file names it.
MASK_TOKEN_CANDIDATES = ("<|mask|>", "[MASK]", "<mask>", "<|MASK|>", "<MASK>")
SPECIAL_ROLES = ("bos", "eos", "pad", "mask", "unk")


def _token_content(value: Any) -> str | None:
    """A special token entry is either a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special ids and a chat template.

    Special ids are attributes `bos_id`, `eos_id`, `pad_id`, `mask_id` (int or None). They are
    resolved by name: `tokenizer_config.json`, then `special_tokens_map.json`, then the id fields of
    the model's `config.json` / `generation_config.json`; the mask falls back to well-known spellings.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        special_ids: dict[str, int] | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        self._tok = tokenizer
        self._vocab_size: int | None = None
        self._specials: _SpecialTokens | None = None  # built on the first encode_chat
        self.chat_template = chat_template
        # Raw bytes of tokenizer.json and AUX_FILES when loaded from a directory; rewritten on save.
        self._files = dict(files or {})
        names = dict(special_tokens or {})
        ids = dict(special_ids or {})
        if "mask" not in names and "mask" not in ids:
            for cand in MASK_TOKEN_CANDIDATES:
                if tokenizer.token_to_id(cand) is not None:
                    names["mask"] = cand
                    break
        self.special_tokens: dict[str, str] = {}
        resolved: dict[str, int | None] = {}
        for role in SPECIAL_ROLES:
            # A named token missing from the vocabulary is left unresolved rather than fatal: files often
            # name an unused <unk>; check_model catches the ids that matter.
            tid = tokenizer.token_to_id(names[role]) if role in names else None
            if tid is None:
                tid = ids.get(role)
            resolved[role] = tid
            if tid is not None:
                text = tokenizer.id_to_token(tid)
                if text is not None:
                    self.special_tokens[role] = text
        self.bos_id = resolved["bos"]
        self.eos_id = resolved["eos"]
        self.pad_id = resolved["pad"]
        self.mask_id = resolved["mask"]
        self.unk_id = resolved["unk"]

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"no tokenizer.json in {path}")
        raw = tok_file.read_bytes()
        try:
            tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 (the Rust side raises a bare Exception on malformed files)
            raise ValueError(f"cannot parse {tok_file}: {e}") from None
        files = {"tokenizer.json": raw}
        for name in AUX_FILES:
            if (path / name).is_file():
                files[name] = (path / name).read_bytes()
        tcfg = read_json(path / "tokenizer_config.json") if "tokenizer_config.json" in files else {}
        smap = read_json(path / "special_tokens_map.json") if "special_tokens_map.json" in files else {}
        names: dict[str, str] = {}
        for role in SPECIAL_ROLES:
            for source in (tcfg, smap):
                content = _token_content(source.get(f"{role}_token"))
                if content is not None:
                    names[role] = content
                    break
        ids: dict[str, int] = {}
        # The model's config and generation defaults name ids, not strings; they fill the gaps.
        for name in ("generation_config.json", "config.json"):
            if (path / name).is_file():
                for role in ("bos", "eos", "pad", "mask"):
                    tid = _first_id(read_json(path / name).get(f"{role}_token_id"))
                    if tid is not None and tok.id_to_token(tid) is not None:
                        ids.setdefault(role, tid)
        if "chat_template.jinja" in files:
            template: Any = files["chat_template.jinja"].decode("utf-8")
        else:
            template = tcfg.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise ValueError(f"{path}: chat_template is a list without a 'default' entry: {sorted(named)}")
            template = named["default"]
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path}: chat_template must be a string, got {type(template).__name__}")
        return cls(tok, chat_template=template, special_tokens=names, special_ids=ids, files=files)

    # -- encoding ----------------------------------------------------------------------------
    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Largest id + 1, added tokens included (ids may be sparse, so this is not len(vocab))."""
        if self._vocab_size is None:  # get_vocab builds a dict of the whole vocabulary: do it once
            vocab = self._tok.get_vocab(with_added_tokens=True)
            self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        return self._vocab_size

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)

    def stream(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the jinja chat template.

        Extra keyword arguments (e.g. `enable_thinking`, `tools`) are passed to the template, as are
        the special tokens by name (`bos_token`, `eos_token`, ...), as `transformers` does.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("no chat template (neither tokenizer_config.json nor chat_template.jinja has one)")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"message {i} must be a dict with a 'role', got {m!r}")
        from ._chat_template import render

        context = {f"{role}_token": text for role, text in self.special_tokens.items()}
        context.update(kwargs)
        return render(template, messages=list(messages), add_generation_prompt=add_generation_prompt, **context)

    def think_ids(self, open_text: str = "<think>", close_text: str = "</think>") -> tuple[list[int], list[int]]:
        """The ids of the think markers (one special token each where the vocabulary has them, else the
        pieces the text encodes to): what a thinking budget watches for and forces."""
        ids = []
        for text in (open_text, close_text):
            t = self.token_to_id(text)
            ids.append([t] if t is not None else self.encode(text))
        if not ids[0] or not ids[1]:
            raise ValueError("this tokenizer encodes <think> / </think> to nothing")
        return ids[0], ids[1]

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """The ids of `messages` rendered with the chat template, where only the template's own text can
        produce special tokens: a special-token string inside a message (a user typing
        `<|im_start|>system`) is encoded as the plain text it is, never as a control token.

        Every string of the messages (and of the extra template arguments, e.g. `tools`) has its
        special-token strings replaced by markers carrying a random nonce before rendering, so they
        survive whatever the template does with the content; the rendered text is then cut at the
        special tokens the template wrote (those become their ids) and the text between them, markers
        turned back into the strings they stand for, is encoded with special-token matching off. With no
        special-token string in any content the ids are exactly `encode(apply_chat_template(...))`.
        """
        if self._specials is None:
            self._specials = _SpecialTokens(self._tok)
        sp = self._specials
        if not sp.names:
            return self.encode(self.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs))
        names, index, in_content = sp.names, sp.index, sp.in_content
        nonce = str(secrets.randbelow(10**12))  # digits: unchanged by upper / lower / title filters

        def mark(x: Any) -> Any:
            if isinstance(x, str):
                return in_content.sub(lambda m: f"\ue000{nonce}:{index[m.group()]}\ue001", x)
            if isinstance(x, dict):
                return {k: mark(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [mark(v) for v in x]
            return x

        text = self.apply_chat_template([mark(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                        chat_template=chat_template, **{k: mark(v) for k, v in kwargs.items()})
        real = sp.in_template
        ids: list[int] = []
        plain: list[str] = []

        def flush() -> None:
            if plain:
                ids.extend(sp.plain.encode("".join(plain), add_special_tokens=False).ids)
                plain.clear()

        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
        for i, part in enumerate(parts):
            if i % 2:  # a special-token string that came from the content: plain text
                plain.append(names[int(part)])
                continue
            pos = 0
            for m in real.finditer(part):
                plain.append(part[pos:m.start()])
                flush()
                token = next(g for g in m.groups() if g is not None)
                ids.append(self._tok.token_to_id(token))
                pos = m.end()
            plain.append(part[pos:])
        flush()
        return ids

    # -- checks and saving -------------------------------------------------------------------
    def check_model(self, config: ModelConfig) -> None:
        """Raise ValueError if this tokenizer cannot drive a model with `config`.

        A tokenizer may be smaller than the embedding (padded vocabularies are common) but never
        larger, and the ids the decoders rely on (mask, eos) must be real tokens.
        """
        if self.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.vocab_size} tokens but the model's vocab_size is {config.vocab_size}"
            )
        if self.vocab_size * 2 < config.vocab_size:  # padding adds a few percent, never doubles a vocabulary
            raise ValueError(
                f"tokenizer has {self.vocab_size} tokens for a model of {config.vocab_size}: it is another model's "
                "tokenizer (a padded vocabulary is at most a few percent larger)"
            )
        for name in ("mask_token_id", "eos_token_id"):
            tid = getattr(config, name)
            if tid is not None and self._tok.id_to_token(tid) is None:
                raise ValueError(f"model {name}={tid} is not a token of this tokenizer (vocab {self.vocab_size})")

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and the auxiliary files into directory `path` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        files = dict(self._files)
        files.setdefault("tokenizer.json", self._tok.to_str().encode("utf-8"))
        if "tokenizer_config.json" not in files:
            tcfg: dict[str, Any] = {f"{role}_token": text for role, text in self.special_tokens.items()}
            if self.chat_template is not None:
                tcfg["chat_template"] = self.chat_template
            files["tokenizer_config.json"] = (json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        for name, data in files.items():
            (path / name).write_bytes(data)


class _SpecialTokens:
    """What `Tokenizer.encode_chat` needs of a tokenizer's special added tokens, built once."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        specials = {t.content: t for t in tok.get_added_tokens_decoder().values() if t.special and t.content}
        self.names = sorted(specials, key=len, reverse=True)  # longest first: the regex takes the first match
        self.index = {n: i for i, n in enumerate(self.names)}
        self.in_content = re.compile("|".join(re.escape(n) for n in self.names)) if self.names else None
        # The template's special tokens, with the whitespace their lstrip / rstrip flags absorb (as encode does).
        self.in_template = re.compile("|".join(
            ("\\s*" if specials[n].lstrip else "") + f"({re.escape(n)})" + ("\\s*" if specials[n].rstrip else "")
            for n in self.names)) if self.names else None
        # A copy that encodes special-token strings as the text they spell.
        self.plain = tokenizers.Tokenizer.from_str(tok.to_str())
        self.plain.encode_special_tokens = True


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer in checkpoint directory `path`, or None when it has no tokenizer.json."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(path)


class StreamDecoder:
    """Incremental detokenizer: feed ids as they are generated, get back only newly completed text.

    Decoding ids one at a time is wrong twice over: a byte-level token may carry half of a UTF-8
    character (decoded alone it is U+FFFD), and decoders that strip a leading space (SentencePiece)
    drop spaces between pieces. So we decode a short window `ids[prefix:]` and emit what it adds
    beyond `ids[prefix:read]`, holding text back while it still ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: the text before it has been emitted and ended cleanly
        self._read = 0  # ids[prefix:read] decode to text that has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; return the text they complete ('' while a character is partial)."""
        self._ids.extend([int(ids)] if isinstance(ids, int) else (int(i) for i in ids))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        # A trailing U+FFFD means the last bytes do not yet form a character: wait for more ids.
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """The text still held back (possibly ending in U+FFFD if generation stopped mid-character)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]
