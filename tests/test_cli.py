"""The CLI end to end: a saved checkpoint with a tokenizer, every mode, --json, clean errors."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from trimode.checkpoint import save_model
from trimode.cli import main
from trimode.config import ModelConfig
from trimode.model import Transformer, init_weights
from trimode.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|mask|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, trainer)
    d = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer(hf, special_tokens={"eos": "<|endoftext|>", "mask": "<|mask|>"},
                    chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    V = hf.get_vocab_size()
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_seq_len=256, mask_token_id=tok.mask_id,
                      eos_token_id=tok.eos_id, block_len=4)
    model = init_weights(Transformer(cfg), seed=3, std=0.2)
    save_model(model, d, tokenizer=tok)
    return d


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_every_mode(ckpt, capsys):
    outs = {}
    for mode in ("ar", "diffusion", "linear", "quadratic"):
        outs[mode] = run_json(capsys, "generate", "--model", str(ckpt), "--mode", mode, "--prompt", "def add(",
                              "--max-new-tokens", "12", "--dtype", "float64", "--json")
        assert outs[mode]["nfe"] >= 1 and outs[mode]["mode"] == mode
    assert outs["linear"]["tokens"] == outs["ar"]["tokens"] == outs["quadratic"]["tokens"]
    assert outs["ar"]["nfe"] == len(outs["ar"]["tokens"])


def test_generate_chat_and_text_output(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "--prompt", "hi", "--chat", "--max-new-tokens", "4"]) == 0
    cap = capsys.readouterr()
    assert "[ar]" in cap.err and "forwards" in cap.err


def test_bad_input_gives_clean_errors(ckpt, tmp_path, capsys):
    assert main(["generate", "--model", str(ckpt), "--prompt", "x", "--block-len", "0", "--mode", "linear"]) == 2
    assert "block_len" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(ckpt), "--prompt", "x", "--mode", "beam"])


def test_demo_json(capsys):
    res = run_json(capsys, "demo", "--model", "bundled", "--dtype", "float32", "--max-new-tokens", "6", "--json")
    by_mode = {r["mode"]: r for r in res["results"]}
    assert set(by_mode) == {"ar", "diffusion", "linear", "quadratic"}
    n = res["prompts"]
    assert by_mode["linear"]["identical_to_ar"] == n and by_mode["quadratic"]["identical_to_ar"] == n
    assert by_mode["ar"]["speedup_vs_ar"] == 1.0 and by_mode["ar"]["forward_cost_vs_ar"] == 1.0
    for r in res["results"]:  # the printed identity: speed-up = tokens per forward / forward cost
        assert r["speedup_vs_ar"] == pytest.approx(
            r["tokens_per_forward"] / r["forward_cost_vs_ar"] / by_mode["ar"]["tokens_per_forward"])


def test_dtype_flags_share_one_table(monkeypatch):
    from trimode import dtypes

    assert dtypes.parse_dtype("bf16") is torch.bfloat16 and dtypes.parse_dtype("float32") is torch.float32
    assert dtypes.parse_dtype(None) is None and dtypes.parse_dtype("stored") is None
    assert dtypes.parse_dtype("auto", device="cuda") is torch.bfloat16
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: False)
    assert dtypes.parse_dtype("auto") is torch.float32 and "no native bf16" in dtypes.auto_reason()
    monkeypatch.setattr(dtypes, "cpu_has_fast_bf16", lambda: True)
    assert dtypes.parse_dtype("auto") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        dtypes.parse_dtype("int8")
    with pytest.raises(ValueError, match="not supported here"):
        dtypes.parse_dtype("float64", allowed=(torch.float32, torch.bfloat16))


def test_bf16_decoding_runs_and_matches_fp32_logits():
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_seq_len=256, mask_token_id=95)
    m = init_weights(Transformer(cfg), seed=0, std=0.05).eval()
    toks = torch.randint(0, 95, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(toks)
        got = m.to(torch.bfloat16)(toks).float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    from trimode import generate

    for mode in ("ar", "diffusion", "linear", "quadratic"):
        assert len(generate(m, [[1, 2, 3]], mode=mode, max_new_tokens=8, block_len=4)[0].tokens) == 8
