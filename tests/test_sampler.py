"""The learned unmasking sampler: trajectories, features, training, the policy in diffusion mode."""

import pytest
import torch
from _accel import prompts, trained_tiny

from trimode import generate
from trimode.decode.learned import FEATURES, LearnedPolicy, load_sampler
from trimode.decode.policies import Threshold
from trimode.train.sampler import auc, collect, evaluate_scores, fit

N = 24
K = 8


PROMPTS = prompts(4, 7)


@pytest.fixture(scope="module")
def setup():
    m = trained_tiny()
    quiet = lambda s: None  # noqa: E731
    train = collect(m, prompts(48, 1), block_len=K, new=N, eos_id=None, batch=48, log=quiet)
    held = collect(m, prompts(24, 2), block_len=K, new=N, eos_id=None, batch=24, seed=1, log=quiet)
    return m, train, held


def test_trajectories_shapes_and_labels(setup):
    _, train, _ = setup
    assert train.feats.shape[1:] == (K - 1, len(FEATURES))
    assert train.cand.any(1).all()  # one record per forward that had something to fill
    rate = float(train.label[train.cand].float().mean())
    assert 0.1 < rate < 0.9  # both classes occur


def test_auc_small_example():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_sampler_beats_random_policy_on_held_out_data(setup, kind, tmp_path):
    m, train, held = setup
    s = fit(train, kind, steps=100, batch=64, log=lambda s: None)
    ev = evaluate_scores(s, held)
    conf = evaluate_scores(None, held)  # confidence alone
    # The slot the learned policy fills first is right more often than a random masked slot, and its
    # scores rank right and wrong top-1s better than chance and than the raw confidence.
    assert ev["precision_first"] > ev["precision_random"], ev
    assert ev["auc"] > 0.7 and ev["auc"] > conf["auc"], (ev, conf)
    s.save(tmp_path / kind)
    back = load_sampler(tmp_path)
    assert back.kind == kind
    assert torch.allclose(back.scores(held.feats[:5]), s.scores(held.feats[:5]))


def test_learned_policy_in_diffusion_mode(setup):
    m, train, _ = setup
    s = fit(train, "mlp", steps=100, batch=128, log=lambda s: None)
    ar = [g.tokens for g in generate(m, PROMPTS, mode="ar", max_new_tokens=N)]
    strict = generate(m, PROMPTS, mode="diffusion", max_new_tokens=N, block_len=K, policy=LearnedPolicy(s, 1.0))
    loose = generate(m, PROMPTS, mode="diffusion", max_new_tokens=N, block_len=K, policy=LearnedPolicy(s, 0.0))
    assert all(len(g.tokens) == N for g in strict + loose)
    # threshold 1: one slot per denoising forward; threshold 0: the whole block in one forward.
    assert all(g.stats["forwards"]["denoise"] == N - N // K for g in strict)
    assert all(g.stats["forwards"]["denoise"] == N // K for g in loose)
    assert sum(g.stats["tpf"] for g in loose) > sum(g.stats["tpf"] for g in strict)
    assert len(ar) == len(strict)
    with pytest.raises(ValueError):
        LearnedPolicy(s, 1.5)
    # Same decoding loop as the threshold policy: with a threshold-equivalent policy the outputs match.
    a = generate(m, PROMPTS, mode="diffusion", max_new_tokens=N, block_len=K, threshold=0.9)
    b = generate(m, PROMPTS, mode="diffusion", max_new_tokens=N, block_len=K, policy=Threshold(0.9))
    assert [g.tokens for g in a] == [g.tokens for g in b]


def test_cli_generate_policy_learned(tmp_path, capsys):
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from trimode.checkpoint import save_model
    from trimode.cli import main
    from trimode.config import ModelConfig
    from trimode.decode.learned import N_FEATURES, MLPScorer, Sampler
    from trimode.model import Transformer, init_weights
    from trimode.tokenizer import Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|mask|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(hf, special_tokens={"eos": "<|endoftext|>", "mask": "<|mask|>"})
    cfg = ModelConfig(vocab_size=hf.get_vocab_size(), hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=128, mask_token_id=tok.mask_id,
                      eos_token_id=None, block_len=4)
    save_model(init_weights(Transformer(cfg), seed=1, std=0.2), tmp_path, tokenizer=tok)
    Sampler("mlp", MLPScorer(), torch.zeros(N_FEATURES), torch.ones(N_FEATURES), {"sizes": {"hidden": 64}}).save(
        tmp_path / "sampler" / "mlp")
    assert main(["generate", "--model", str(tmp_path), "--mode", "diffusion", "--policy", "learned",
                 "--threshold", "0.5", "--prompt", "def add(", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 8 and out["mode"] == "diffusion"
    for extra in (["--policy", "learned", "--rule", "joint"], ["--rule", "joint"]):
        assert main(["generate", "--model", str(tmp_path), "--mode", "diffusion", *extra, "--threshold", "0.3",
                     "--prompt", "def add(", "--max-new-tokens", "8", "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["tokens"]) == 8
    assert main(["generate", "--model", str(tmp_path), "--mode", "diffusion", "--rule", "joint",
                 "--threshold", "1.5", "--prompt", "def add("]) == 2
    assert main(["generate", "--model", str(tmp_path), "--mode", "diffusion", "--policy", "learned",
                 "--sampler", str(tmp_path / "nowhere"), "--prompt", "def add("]) == 2


def test_joint_rule_bounds_the_product_of_scores():
    from trimode.decode.policies import joint_select, threshold_select

    score = torch.tensor([[0.9, 0.2, 0.8, 0.95], [0.5, 0.4, 0.3, 0.2]])
    cand = torch.tensor([[True, True, True, False], [False, True, True, True]])
    # row 0: 0.9 then 0.9 * 0.8 = 0.72 >= 0.7, then * 0.2 < 0.7 (slot 3 is no candidate);
    # row 1: best candidate 0.4 always, 0.4 * 0.3 < 0.7.
    assert joint_select(score, cand, 0.7).tolist() == [[True, False, True, False], [False, True, False, False]]
    assert joint_select(score, cand, 0.0).equal(cand)  # tau 0: everything
    assert joint_select(score, cand, torch.tensor([[0.0], [2.0]])).tolist() == [cand[0].tolist(),
                                                                                [False, True, False, False]]
    # "each" lets slots through one by one: at 0.7 row 0 takes 0.9 and 0.8 too (all right only 0.72)
    assert threshold_select(score, cand, 0.7).tolist() == [[True, False, True, False], [False, True, False, False]]
    assert threshold_select(score, cand, 0.15).tolist()[0] == [True, True, True, False]
    assert joint_select(score, cand, 0.15).tolist()[0] == [True, False, True, False]  # 0.9*0.8*0.2 < 0.15


def test_on_policy_recorder_decodes_like_its_behaviour_and_labels_against_ar(setup):
    from trimode.decode.policies import JointThreshold
    from trimode.train.sampler import OnPolicyRecorder

    m, _, _ = setup
    P = prompts(6, 11)
    ar = [g.tokens for g in generate(m, P, mode="ar", max_new_tokens=N)]
    for rule, ref_policy in (("each", Threshold(0.6)), ("joint", JointThreshold(0.4))):
        rec = OnPolicyRecorder(m, None, [("confidence", rule, ref_policy.tau)] * len(P), {})
        got = generate(m, P, mode="diffusion", max_new_tokens=N, block_len=K, policy=rec)
        want = generate(m, P, mode="diffusion", max_new_tokens=N, block_len=K, policy=ref_policy)
        assert [g.tokens for g in got] == [g.tokens for g in want]  # recording changes nothing
        assert len(rec.refs) == len(P) * (N // K)  # one AR rollout per row and block
        checked = 0
        for (i, start), ref in rec.refs.items():
            assert len(ref) == K - 1
            if got[i].tokens[:start] == ar[i][:start]:  # committed context still on the AR path:
                assert ref == ar[i][start + 1:start + K]  # the rollout is AR's own continuation
                checked += 1
        assert checked >= len(P)  # at least every first block
        t = rec.trajectories()
        assert 0 < t.label[t.cand].float().mean() < 1  # both classes among the slots a policy chose from


def test_dagger_rounds_pool_on_policy_records():
    from trimode.train.sampler import train_samplers

    m = trained_tiny()
    quiet = lambda s: None  # noqa: E731
    s0, pool0, _ = train_samplers(m, prompts(16, 3), ["mlp"], block_len=K, new=16, eos_id=None, rounds=0,
                                  steps=20, batch=16, fit_batch=32, log=quiet)
    s1, pool1, val = train_samplers(m, prompts(16, 3), ["mlp"], block_len=K, new=16, eos_id=None, rounds=1,
                                    steps=20, batch=16, fit_batch=32, log=quiet, holdout=0.2)
    assert set(s0) == set(s1) == {"mlp"}
    assert len(pool1) + len(val) > len(pool0)  # round 1 added its own records
    assert val is not None and len(val) > 0


def test_cli_train_sampler_on_policy_rounds(tmp_path, capsys):
    import json

    from trimode.train.sampler import main

    out = tmp_path / "s"
    assert main(["--model", "bundled", "--out", str(out), "--n-prompts", "4", "--new-tokens", "16", "--batch", "4",
                 "--steps", "10", "--rounds", "1", "--kinds", "mlp", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["rounds"] == 1 and res["records"] > 0 and "mlp" in res
    s = load_sampler(out)
    assert s.kind == "mlp" and s.meta["rounds"] == 1
    assert main(["--model", "bundled", "--out", str(out), "--rounds", "-1"]) == 2
    assert main(["--model", "bundled", "--out", str(out), "--kinds", "gbm"]) == 2


def test_top1_is_argmax_with_ties():
    from trimode.sampling import top1

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randint(0, 3, (4, 13, 4099), generator=g).to(dtype)  # many ties per row
        x[0, 0] = 0.0  # a row that is all ties
        x[1, 1, 7:] = float("-inf")
        assert torch.equal(top1(x), x.argmax(-1))
        assert top1(x)[0, 0] == 0
