"""Benchmark harness on a tiny random model: counters, the NFE wrapper, the oracle, peers, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._tiny import tiny_model
from trimode.bench import runner
from trimode.bench.metrics import conditional_acceptance, summarize
from trimode.bench.roofline import forward_cost, layer_params
from trimode.bench.runner import Config, RowResult, run_config
from trimode.bench.suites import Prompt, build_suites, synthetic_suites
from trimode.bench.sweep import crossover, write_serving
from trimode.bench.timing import TimedModel
from trimode.checkpoint import save_model

BUNDLED = Path(__file__).resolve().parents[1] / "trimode" / "assets" / "bundled"
ALL = [Config("ar"), Config("diffusion", 4, 0.9), Config("diffusion", 4, None, "oracle"), Config("linear", 4),
       Config("quadratic", 3)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(eos=5, adapter=True, dtype=torch.float32)


@pytest.fixture(scope="module")
def suites(model):
    return synthetic_suites(model.config.vocab_size, n=2, avoid=[95, 5])


def _reference(model, suites, batch_size=1):
    res = run_config(model, suites, Config("ar"), max_new_tokens=12, batch_size=batch_size)
    return {r.prompt.source: r.tokens for r in res.rows}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_counters_consistent_every_mode(model, suites, batch_size: int) -> None:
    ref = _reference(model, suites)
    for cfg in ALL:
        res = run_config(model, suites, cfg, max_new_tokens=12, batch_size=batch_size, reference=ref)
        s = summarize(res, model.config, bytes_per_weight=4, machine=None, reference=ref)
        for r in res.rows:
            assert len(r.tokens) == sum(r.stats["step_tokens"])  # tokens == sum of per-step commits
            assert r.stats["nfe"] <= len(res.calls)
        assert s["tokens"] == sum(k * v for k, v in s["step_hist"].items())
        assert s["forwards_run"] == len(res.calls) == sum(k["count"] for k in s["kinds"].values())
        assert all(c.kind != "?" for c in res.calls)
        if batch_size == 1:  # one row per forward: the wrapper's count is the reported NFE
            assert s["nfe"] == len(res.calls)
            assert all(r.stats["nfe"] == r.nfe_steps for r in res.rows)
            for cat, calls in res.by_category_calls.items():
                assert s["categories"][cat]["nfe"] == len(calls)
        if cfg.mode in ("linear", "quadratic") or cfg.policy == "oracle" or cfg.mode == "ar":
            assert s["identical_to_ar"] == 1.0, cfg.label
        if cfg.speculative:
            acc = [a for r in res.rows for a in r.stats["acceptance"]]
            assert s["mean_acceptance"] == pytest.approx(sum(acc) / len(acc))


def test_wrapper_counts_forwards_not_the_decoders_bookkeeping(model, suites, monkeypatch) -> None:
    timed = TimedModel(model)
    x = torch.tensor([[1, 2, 3]])
    timed(x)
    timed(x)
    assert len(timed.calls) == 2 and timed.config is model.config

    real_run = runner.run

    def hidden_forward(m, mode, cfg, rows):  # a decoder whose Steps omit one forward it ran
        for i, step in enumerate(real_run(m, mode, cfg, rows)):
            if i != 1:
                yield step

    monkeypatch.setattr(runner, "run", hidden_forward)
    with pytest.raises(RuntimeError, match="forward"):
        run_config(model, suites, Config("ar"), max_new_tokens=6)


def test_oracle_reaches_at_least_the_threshold_policy(model, suites) -> None:
    ref = _reference(model, suites)
    out = {}
    for cfg in (Config("diffusion", 8, 0.9), Config("diffusion", 8, None, "oracle")):
        res = run_config(model, suites, cfg, max_new_tokens=12, reference=ref)
        out[cfg.policy] = summarize(res, model.config, bytes_per_weight=4, machine=None, reference=ref)
    assert out["oracle"]["identical_to_ar"] == 1.0
    assert out["oracle"]["tpf"] >= out["threshold"]["tpf"]


class _ParrotModel(torch.nn.Module):
    """A stub whose every position predicts `(token + 1) % V` of the reference chain 10, 11, 12, ...:
    causal logits predict the next token and mask slots predict the token at their position."""

    def __init__(self, base) -> None:
        super().__init__()
        self.base = base
        self.config = base.config

    def __getattr__(self, name):
        if name in ("base", "config"):
            return super().__getattr__(name)
        return getattr(self.base, name)

    def forward(self, tokens, positions=None, *, logits_at=None, **kw):
        self.base(tokens, positions, logits_at=logits_at, **kw)  # keep the cache writes
        V = self.config.vocab_size
        want = positions.gather(1, logits_at) if logits_at is not None else positions
        mask_id = self.config.mask_token_id
        # The token generated at position p is 10 + p (mod V, skipping the mask id); every slot knows it.
        nxt = (10 + want + 1) % (V - 1)
        is_mask = (tokens.gather(1, logits_at) if logits_at is not None else tokens) == mask_id
        nxt = torch.where(is_mask, (10 + want) % (V - 1), nxt)
        return torch.nn.functional.one_hot(nxt, V).float() * 50.0


def test_oracle_on_a_stub_denoiser_that_knows_everything(model) -> None:
    """A denoiser that is always right: the oracle fills the whole block in one denoising forward."""
    stub = _ParrotModel(model)
    p = Prompt("coding", "stub/0", "", tuple(10 + i for i in range(6)))
    suites = {"coding": [p]}
    ref = {r.prompt.source: r.tokens for r in run_config(stub, suites, Config("ar"), max_new_tokens=16).rows}
    sol = run_config(stub, suites, Config("diffusion", 8, None, "oracle"), max_new_tokens=16, reference=ref)
    s = summarize(sol, model.config, bytes_per_weight=4, machine=None, reference=ref)
    assert s["identical_to_ar"] == 1.0
    assert max(s["step_hist"]) == 7  # a whole block's masks in one forward
    thr = run_config(stub, suites, Config("diffusion", 8, 0.9), max_new_tokens=16, reference=ref)
    t = summarize(thr, model.config, bytes_per_weight=4, machine=None, reference=ref)
    assert s["tpf"] >= t["tpf"] > 1.5


def test_conditional_acceptance_by_hand() -> None:
    p = Prompt("coding", "x", "", (1,))
    rows = [RowResult(p, [], {"acceptance": [1, 2, 4, 3, 1]}, "length", 0)]  # the last verify is left out
    # accepted: 0, 1, 3, 2 -> P(1) = 3/4, P(2 | 1) = 2/3, P(3 | 2) = 1/2
    assert conditional_acceptance(rows, 3) == [0.75, pytest.approx(2 / 3), 0.5]


def test_roofline_costs_and_crossover(model, tmp_path: Path) -> None:
    c = model.config
    f, b = forward_cost(c, B=1, T=1, S=1, n_logits=1, bytes_per_weight=4)
    assert f == pytest.approx(2 * c.num_layers * layer_params(c) + 4 * c.num_layers * c.q_dim
                              + 2 * c.hidden_size * c.vocab_size)
    assert b > 4 * c.num_layers * layer_params(c)
    rows = [{"batch": 1, "ratio": 1.5}, {"batch": 2, "ratio": 1.1}, {"batch": 4, "ratio": 0.9},
            {"batch": 8, "ratio": 1.2}]
    assert crossover(rows) == 2
    assert crossover([{"batch": 1, "ratio": 0.8}]) == 0
    (tmp_path / "serving.json").write_text(json.dumps({"other": 1}))
    write_serving(tmp_path, {"auto_crossover": 2})
    assert json.loads((tmp_path / "serving.json").read_text()) == {"other": 1, "auto_crossover": 2}


def test_synthetic_shape_runs_on_cpu() -> None:
    from trimode.bench.synthetic import run_synthetic

    res = run_synthetic("tiny", device="cpu", dtype=torch.float32, context=16, linear_ks=(4,),
                        quadratic_ks=(2, 3), accept=(2.0, 5.46), reps=1)
    kinds = {(k["kind"], k["k"]) for k in res["kinds"]}
    assert kinds == {("prefill", 16), ("ar", 1), ("draft", 4), ("verify", 4), ("quadratic", 2), ("quadratic", 3)}
    proj = {r["scheme"]: r for r in res["projection"]}
    assert proj["linear k=4"]["tokens_per_s"]["5.46"] is None  # longer than the block
    assert proj["quadratic k=3"]["tokens_per_s"]["2.0"] > 0
    assert proj["ar"]["speedup_vs_ar"]["2.0"] == pytest.approx(1.0)


def test_suites_from_shared_data() -> None:
    from trimode.prompts import data_root
    from trimode.tokenizer import load_tokenizer

    data = data_root(required=False)
    if data is None:
        pytest.skip("no benchmark data directory ($TRIMODE_DATA or shared/data beside the checkout)")
    tok = load_tokenizer(BUNDLED)
    raw = build_suites(tok, n=3, categories=["coding", "math", "domain"], model_dir=BUNDLED, data=data)
    assert [p.source.split("/")[0] for p in raw["coding"]] == ["HumanEval", "mbpp", "HumanEval"]
    assert len(raw["math"]) == 3 and raw["math"][0].text.startswith("Question:")
    assert all(not p.text.endswith("\n") for p in raw["coding"])
    if "domain" in raw:  # the held-out stdlib files of the running interpreter
        assert all(len(p.tokens) == 96 for p in raw["domain"])
    chat = build_suites(tok, n=1, categories=["math"], chat=True)
    assert chat["math"][0].text.startswith("<|im_start|>user")


def _cli(argv: list[str], capsys) -> dict:
    from trimode.bench.cli import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_json(model, tmp_path: Path, capsys) -> None:
    save_model(model, tmp_path / "m")
    out = _cli(["--model", str(tmp_path / "m"), "--prompts", "2", "--max-new-tokens", "8", "--block-lens", "3",
                "--no-roofline", "--json", "--sweep", "1,2", "--write-crossover"], capsys)
    labels = [r["config"] for r in out["runs"]]
    assert labels == ["ar", "diffusion k=3 t=0.9", "sol k=3", "linear k=3", "quadratic k=3"]
    for r in out["runs"]:
        assert r["nfe"] == r["forwards_run"] and r["tokens"] == sum(int(k) * v for k, v in r["step_hist"].items())
        assert set(r["categories"]) == {"coding", "math"}
    assert out["best_speculative"]["identical_to_ar"] == 1.0
    serving = json.loads((tmp_path / "m" / "serving.json").read_text())
    assert serving["auto_crossover"] == out["sweep"]["auto_crossover"]
    assert serving["speculative_mode"] in ("linear", "quadratic")


def test_cli_synthetic(capsys) -> None:
    out = _cli(["--synthetic", "tiny", "--context", "8", "--linear-ks", "4", "--quadratic-ks", "2", "--json",
                "--no-roofline"], capsys)
    assert out["shape"] == "tiny" and len(out["kinds"]) == 5
    if not torch.cuda.is_available():
        out = _cli(["--synthetic", "nld-8b", "--device", "cuda", "--json"], capsys)
        assert "skipped" in out


def test_transformers_peer_matches_our_ar(model) -> None:
    pytest.importorskip("transformers")
    from trimode.bench.peers import hf_generate, hf_model, logits_diff

    base = tiny_model(eos=5, dtype=torch.float32)
    hf = hf_model(base)
    p = Prompt("coding", "p", "", (1, 2, 3, 4))
    assert logits_diff(base, hf, p.tokens) < 1e-4
    ours = run_config(base, {"coding": [p]}, Config("ar"), max_new_tokens=8, eos_id=5).rows[0].tokens
    for lookup in (None, 3):
        r = hf_generate(hf, [p], max_new_tokens=8, eos_id=5, lookup=lookup)
        assert r.outputs["p"] == ours


def test_tree_min_probs_add_cut_feature_trees_and_bad_values_are_clear() -> None:
    import argparse

    from trimode.bench.cli import build_parser, make_configs

    class WithDrafter:
        feature_drafter = object()

    p = build_parser()
    args = p.parse_args(["--modes", "ar,linear", "--block-lens", "5", "--tree-nodes", "8", "--drafters", "feature",
                         "--tree-min-probs", "0.05,0.1"])
    labels = [c.label for c in make_configs(args, WithDrafter())]
    assert labels == ["ar", "linear k=5 feature", "linear k=5 tree8 feature", "linear k=5 tree8 feature p0.05",
                      "linear k=5 tree8 feature p0.1"]
    args = p.parse_args(["--modes", "ar,linear", "--block-lens", "5", "--drafters", "feature",
                         "--tree-min-probs", "0.05"])
    with pytest.raises(ValueError, match="--tree-min-probs"):
        make_configs(args, WithDrafter())  # no tree to cut
    for bad in ("0", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            __import__("trimode.bench.cli", fromlist=["x"])._probs(bad)


def test_datastore_both_adds_no_ds_twins_of_feature_trees_only() -> None:
    from trimode.bench.cli import build_parser, make_configs
    from trimode.models import choose_block_lens

    class Drafter:
        datastore = object()

    class WithDatastore:
        feature_drafter = Drafter()

    p = build_parser()
    argv = ["--modes", "ar,linear", "--block-lens", "5", "--tree-nodes", "8", "--drafters", "feature"]
    on = [c.label for c in make_configs(p.parse_args(argv), WithDatastore())]
    assert on == ["ar", "linear k=5 feature", "linear k=5 tree8 feature"]
    both = make_configs(p.parse_args(argv + ["--datastore", "both"]), WithDatastore())
    assert [c.label for c in both] == on + ["linear k=5 tree8 feature no-ds"] and not both[-1].datastore
    off = make_configs(p.parse_args(argv + ["--datastore", "off"]), WithDatastore())
    assert [c.label for c in off] == ["ar", "linear k=5 feature", "linear k=5 tree8 feature no-ds"]
    plain = type("M", (), {"feature_drafter": type("F", (), {"datastore": None})()})()
    assert [c.label for c in make_configs(p.parse_args(argv + ["--datastore", "both"]), plain)] == on
    # a faster no-ds comparison run is not what --write-block-lens stores
    runs = [{"mode": "linear", "block_len": 5, "tree_nodes": 8, "drafter": "feature", "tokens_per_s": 10.0,
             "config": "a", "datastore": True},
            {"mode": "linear", "block_len": 8, "tree_nodes": 8, "drafter": "feature", "tokens_per_s": 11.0,
             "config": "b", "datastore": False}]
    assert choose_block_lens(runs)["block_len"]["linear"] == 5
