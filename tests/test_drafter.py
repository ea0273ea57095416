"""The LoRA drafter: per-call adapter switching, training/inference mask agreement, PEFT round trips,
a short self-distillation run that raises acceptance while greedy output stays equal to AR."""

import copy
import json

import pytest
import torch
from _accel import prompts, trained_tiny
from _tiny import PROMPTS, tiny_model

from trimode import generate, masks
from trimode.checkpoint import export_nld, load_model, save_model
from trimode.peft import load_adapter, save_adapter
from trimode.train.distill import ar_continuations
from trimode.train.draft_objective import draft_training_inputs, draft_training_mask
from trimode.train.drafter import DrafterConfig, default_out, fit_drafter, reinit_adapter

N = 24


def test_add_adapter_with_a_generator_leaves_the_global_rng_alone():
    models = [tiny_model(adapter=False) for _ in range(3)]  # building a model may draw from the global RNG

    def attach(m, seed):
        m.add_adapter("draft", targets=("o_proj",), r=4, alpha=8.0, generator=torch.Generator().manual_seed(seed))
        return {n: p.clone() for n, p in m.named_parameters() if ".adapters.draft." in n}

    torch.manual_seed(123)
    expect_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = attach(models[0], 5), attach(models[1], 5), attach(models[2], 6)
    assert torch.equal(torch.rand(3), expect_next)  # the global stream was not consumed
    assert a.keys() == b.keys() and len(a) == 4  # A and B in each of the two layers' o_proj
    assert all(torch.equal(a[k], b[k]) for k in a)  # same generator seed, same init
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith(".A"))
    assert all(not a[k].any() for k in a if k.endswith(".B"))  # B = 0: starts as a no-op


def test_adapter_is_chosen_per_call_with_no_global_state():
    m = tiny_model(adapter=True)
    plain = tiny_model(adapter=False)  # same seed: same base weights, no adapter at all
    x = torch.tensor([PROMPTS[2]])
    base = m(x)
    on = m(x, adapter="draft")
    assert not torch.allclose(base, on)
    for _ in range(2):  # interleaved calls never leak state into each other
        assert torch.equal(m(x), base)
        assert torch.equal(m(x, adapter="draft"), on)
    assert torch.allclose(base, plain(x), atol=1e-12)
    assert torch.equal(m(x, adapter="no-such-adapter"), base)
    # adapter_tokens: causal call with the adapter on the last token only leaves earlier logits at base.
    gate = torch.zeros_like(x, dtype=torch.bool)
    gate[:, -1] = True
    part = m(x, adapter="draft", adapter_tokens=gate)
    assert torch.allclose(part[:, :-1], base[:, :-1], atol=1e-12)
    assert not torch.allclose(part[:, -1], base[:, -1])


def test_training_mask_small_example():
    m = draft_training_mask(3, torch.tensor([[1, 2]]), 2)[0]
    want = torch.tensor([
        # clean 0 1 2 | block0 (t=1) | block1 (t=2)
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 0, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1],
        [1, 1, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, want)


@pytest.mark.parametrize("dlm_type", ["llada", "dream"])
def test_training_forward_equals_cached_draft_pass(dlm_type):
    """Each block of the batched training forward gives the logits of the inference draft pass:
    cache = causal prefill of x[:t], canvas [x_t, MASK x (K-1)] bidirectional, adapter on."""
    m = tiny_model(adapter=True, dlm_type=dlm_type)
    c = m.config
    K = 4
    x = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]])
    anchors = torch.tensor([[2, 5, 9, 6]])
    adapt_anchor = torch.tensor([[True, False, True, True]])
    tokens, positions, mask, gate = draft_training_inputs(x, anchors, K, mask_id=c.mask_token_id,
                                                          max_seq_len=c.max_seq_len, adapt_anchor=adapt_anchor)
    L = x.shape[1]
    with torch.no_grad():
        train_logits = m(tokens, positions, mask=mask, adapter="draft", adapter_tokens=gate)
        assert torch.allclose(train_logits[:, :L], m(x), atol=1e-10)  # the clean stream is the verifier
        for j, t in enumerate(anchors[0].tolist()):
            cache = m.new_cache(1, 64)
            m(x[:, :t], cache=cache)
            cache.commit(torch.tensor([t]))
            canvas = torch.full((1, K), c.mask_token_id)
            canvas[0, 0] = x[0, t]
            S = t + K
            g = torch.ones(1, K, dtype=torch.bool)
            g[0, 0] = bool(adapt_anchor[0, j])
            ref = m(canvas, mask=masks.with_prefix(masks.bidirectional(K), cache.length, S), cache=cache,
                    adapter="draft", adapter_tokens=g)
            got = train_logits[:, L + j * K: L + (j + 1) * K]
            assert torch.allclose(got, ref, atol=1e-10), (j, t)


def test_peft_round_trip_and_load_model_finds_it(tmp_path):
    m = tiny_model(adapter=True)
    x = torch.tensor([PROMPTS[0]])
    want = m(x, adapter="draft")
    save_adapter(m, "draft", tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["o_proj"] and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    fresh = load_adapter(tiny_model(), tmp_path / "ad", name="draft")
    assert torch.equal(fresh(x, adapter="draft"), want)
    # Native dir: the drafter's default output is adapters/draft, which load_model attaches.
    save_model(tiny_model(), tmp_path / "native")
    out = default_out(tmp_path / "native")
    assert out == tmp_path / "native" / "adapters" / "draft"
    save_adapter(m, "draft", out)
    assert torch.allclose(load_model(tmp_path / "native")(x, adapter="draft"), want, atol=1e-6)
    # NLD dir: linear_spec_lora/.
    export_nld(m, tmp_path / "nld")
    assert default_out(tmp_path / "nld") == tmp_path / "nld" / "linear_spec_lora"
    assert torch.allclose(load_model(tmp_path / "nld")(x, adapter="draft"), want, atol=1e-6)


def _acceptance(model, prompts, k):
    gens = generate(model, prompts, mode="linear", max_new_tokens=N, block_len=k)
    acc = [a for g in gens for a in g.stats["acceptance"]]
    return [g.tokens for g in gens], sum(acc) / len(acc)


def test_short_training_raises_acceptance_and_keeps_ar_output():
    m = trained_tiny()
    seqs = ar_continuations(m, prompts(32, 11), new=N, eos_id=None, log=lambda s: None)
    held = prompts(8, 12)
    ref = [x.tokens for x in generate(m, held, mode="ar", max_new_tokens=N)]
    toks0, acc0 = _acceptance(m, held, 4)
    m = copy.deepcopy(m)
    m.add_adapter("draft", r=8, alpha=32.0)
    reinit_adapter(m, "draft", seed=0)
    params = [p for n, p in m.named_parameters() if ".adapters.draft." in n]
    for p in params:
        p.requires_grad_(True)
    cfg = DrafterConfig(model="-", steps=30, batch=8, blocks_per_seq=8, block_lens=(4,), lr=5e-3, warmup=3)
    hist = fit_drafter(m, seqs, cfg, params=params, log=lambda s: None)
    first, last = hist[:5], hist[-5:]
    assert sum(h["loss"] for h in last) < sum(h["loss"] for h in first)
    m.eval()
    toks1, acc1 = _acceptance(m, held, 4)
    assert toks0 == toks1 == ref  # greedy output with the trained adapter is still AR's
    assert [x.tokens for x in generate(m, held, mode="quadratic", max_new_tokens=N, block_len=4)] == ref
    assert acc1 >= acc0


def test_interrupted_drafter_run_resumes_bit_identical(tmp_path):
    from safetensors.torch import load_file

    from trimode.train.drafter import STATE, resolve_model_dir, train_drafter

    base = dict(model="bundled", n_prompts=4, new_tokens=8, gen_batch=4, steps=5, batch=2, blocks_per_seq=2,
                block_lens=(4,), save_every=2, log_every=1, data_cache=str(tmp_path / "data.pt"))
    quiet = lambda s: None  # noqa: E731
    train_drafter(DrafterConfig(out=str(tmp_path / "full"), **base), log=quiet)

    class Crash(Exception):
        pass

    def crash_at_step_3(line):
        if line.startswith("step     3"):
            raise Crash

    with pytest.raises(Crash):
        train_drafter(DrafterConfig(out=str(tmp_path / "cut"), **base), log=crash_at_step_3)
    assert (tmp_path / "cut" / STATE).exists()  # the step-2 adapter and trainer state survived the crash
    m = load_model(resolve_model_dir("bundled"))
    load_adapter(m, tmp_path / "cut", name="draft")  # ... and the adapter there is a usable PEFT adapter
    lines = []
    train_drafter(DrafterConfig(out=str(tmp_path / "cut"), **base), log=lines.append)
    assert any(line.startswith("resuming from step 2") for line in lines)
    assert not (tmp_path / "cut" / STATE).exists()  # a finished run leaves only the adapter
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "full" / "training.json").read_text())["history"]
    hb = json.loads((tmp_path / "cut" / "training.json").read_text())["history"]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]

    # A resume with other settings is refused with a clear error; --no-resume starts over.
    with pytest.raises(Crash):
        train_drafter(DrafterConfig(out=str(tmp_path / "cut2"), **base), log=crash_at_step_3)
    with pytest.raises(ValueError, match="steps"):
        train_drafter(DrafterConfig(out=str(tmp_path / "cut2"), **{**base, "steps": 6}), log=quiet)
    (tmp_path / "cut2" / STATE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="no-resume"):
        train_drafter(DrafterConfig(out=str(tmp_path / "cut2"), **base), log=quiet)
    train_drafter(DrafterConfig(out=str(tmp_path / "cut2"), **base, resume=False), log=quiet)
    assert not (tmp_path / "cut2" / STATE).exists()


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--batch", "0"), ("--save-every", "-1"),
                                        ("--block-len", "1"), ("--lr", "0")])
def test_train_drafter_rejects_bad_settings(flag, value, capsys):
    from trimode.train.drafter import main

    assert main(["--model", "bundled", "--out", "/nonexistent/x", flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_init_adapter_continues_from_a_trained_adapter(tmp_path):
    """--init-adapter warm-starts from an adapter: its first step's loss is the loss the first run ended
    near (not a fresh adapter's), it keeps that adapter's shape, and conflicting flags are refused."""
    from trimode.train.drafter import train_drafter

    base = dict(model="bundled", n_prompts=8, new_tokens=12, gen_batch=8, batch=4, blocks_per_seq=4,
                block_lens=(4,), save_every=0, log_every=1, lr=5e-3, warmup=1,
                data_cache=str(tmp_path / "data.pt"), targets=("o_proj", "down_proj"), rank=4)
    quiet = lambda s: None  # noqa: E731
    first = train_drafter(DrafterConfig(out=str(tmp_path / "a"), steps=12, **base), log=quiet)
    fresh = json.loads((tmp_path / "a" / "training.json").read_text())["history"][0]["loss"]
    warm = dict(base, targets=("o_proj",), rank=None)  # flags left at their defaults take the adapter's
    lines = []
    res = train_drafter(DrafterConfig(out=str(tmp_path / "b"), steps=2, init_adapter=str(tmp_path / "a"),
                                      **warm), log=lines.append)
    assert any("initialised the draft adapter from" in s for s in lines)
    assert res["r"] == 4 and sorted(res["targets"]) == ["down_proj", "o_proj"]
    again = json.loads((tmp_path / "b" / "training.json").read_text())["history"][0]["loss"]
    assert again < 0.8 * fresh, (again, fresh, first["last"]["loss"])
    with pytest.raises(ValueError, match="--rank 8 differs"):
        train_drafter(DrafterConfig(out=str(tmp_path / "c"), steps=1, init_adapter=str(tmp_path / "a"),
                                    **dict(warm, rank=8)), log=quiet)
    with pytest.raises(ValueError, match="--targets"):
        train_drafter(DrafterConfig(out=str(tmp_path / "c"), steps=1, init_adapter=str(tmp_path / "a"),
                                    **dict(warm, targets=("q_proj",))), log=quiet)
    with pytest.raises(ValueError, match="not a directory"):
        train_drafter(DrafterConfig(out=str(tmp_path / "c"), steps=1, init_adapter=str(tmp_path / "nope"),
                                    **warm), log=quiet)


def test_draft_vocab_is_written_from_the_self_distilled_targets(tmp_path):
    from trimode.train.drafter import resolve_model_dir, train_drafter

    base = dict(model="bundled", n_prompts=4, new_tokens=8, gen_batch=4, steps=1, batch=2, blocks_per_seq=2,
                block_lens=(4,), save_every=0, log_every=1, data_cache=str(tmp_path / "data.pt"))
    lines = []
    res = train_drafter(DrafterConfig(out=str(tmp_path / "a"), draft_vocab=10, **base), log=lines.append)
    seqs = torch.load(tmp_path / "data.pt")
    seen = seqs["tokens"][seqs["valid"].bool()]
    ids = json.loads((tmp_path / "a" / "draft_vocab.json").read_text())["ids"]
    eos = load_model(resolve_model_dir("bundled")).config.eos_token_id
    assert 10 <= len(ids) <= 11 and set(ids) - {eos} and eos in ids  # the 10 ranked first, and EOS
    assert int(torch.bincount(seen).argmax()) in ids  # what the model writes most is draftable
    assert res["draft_vocab"]["size"] == len(ids) and any("draft vocabulary" in s for s in lines)
    m = load_model(resolve_model_dir("bundled"))
    load_adapter(m, tmp_path / "a", name="draft")
    assert m.draft_vocab.tolist() == ids
    train_drafter(DrafterConfig(out=str(tmp_path / "b"), **base), log=lambda s: None)
    assert not (tmp_path / "b" / "draft_vocab.json").exists()  # off by default
