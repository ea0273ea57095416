"""The bundled model: small enough to ship, loads with its tokenizer, and its modes agree."""

import json
from pathlib import Path

import pytest
import torch

BUNDLED = Path(__file__).resolve().parents[1] / "trimode" / "assets" / "bundled"
pytestmark = pytest.mark.skipif(not (BUNDLED / "model.safetensors").exists(), reason="no bundled model")


def test_bundled_files_and_size():
    names = {p.name for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md",
            "heldout_files.json"} <= names
    assert sum(p.stat().st_size for p in BUNDLED.iterdir() if p.is_file()) < 25e6
    assert len(json.loads((BUNDLED / "heldout_files.json").read_text())["files"]) > 0


def test_bundled_loads_and_speculation_matches_ar():
    from trimode.checkpoint import load_model
    from trimode.decode import generate
    from trimode.tokenizer import load_tokenizer

    model = load_model(BUNDLED, dtype=torch.float32)
    tok = load_tokenizer(BUNDLED)
    c = model.config
    assert c.mask_token_id == tok.token_to_id("<|mask|>") and c.eos_token_id == tok.token_to_id("<|endoftext|>")
    prompt = [tok.encode("import os\n\n\ndef list_files(path):\n")]
    with torch.no_grad():
        ar = generate(model, prompt, mode="ar", max_new_tokens=24)[0].tokens
        lin = generate(model, prompt, mode="linear", max_new_tokens=24, block_len=4)[0].tokens
        quad = generate(model, prompt, mode="quadratic", max_new_tokens=24, block_len=4)[0].tokens
    assert ar == lin == quad
    assert len(ar) > 0
