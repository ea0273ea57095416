"""`trimode {demo,generate,train,plot,convert}`: one `main(argv) -> int`, subcommands, `--json` for scripts."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from .decode import Mode

BUNDLED = Path(__file__).parent / "assets" / "bundled"

# Subcommands implemented in other modules: name -> (module, help).
EXTERNAL = {
    "train": ("trimode.train.cli", "train a model with the joint AR + diffusion recipe"),
    "plot": ("trimode.train.plot", "plot a training log (JSONL) to PNG"),
    "convert": ("trimode.convert", "convert a GGUF / Hugging Face model to the trimode format"),
    "bench": ("trimode.bench.cli", "benchmark every mode: tokens/forward, speed-of-light, peers, roofline"),
    "serve": ("trimode.serve.cli", "OpenAI-compatible HTTP server with continuous batching"),
    "train-drafter": ("trimode.train.drafter", "train the LoRA drafter (draft passes only) by self-distillation"),
    "train-sampler": ("trimode.train.sampler", "train the learned unmasking sampler for diffusion mode"),
}


def _dtype(name: str | None):
    import torch

    table = {None: None, "auto": None, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose float32, bfloat16 or float64")
    return table[name]


def load_bundled():
    """The model shipped with the package, or (until one is trained) a seeded random model."""
    if (BUNDLED / "config.json").exists():
        from .checkpoint import load_model
        from .tokenizer import load_tokenizer

        return load_model(BUNDLED), load_tokenizer(BUNDLED), "bundled model (trimode/assets/bundled)"
    return random_demo_model(), None, "RANDOM seeded model (untrained; no bundled model is installed)"


def random_demo_model():
    from .config import ModelConfig
    from .model import Transformer, init_weights

    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_seq_len=1024, mask_token_id=511, block_len=8)
    return init_weights(Transformer(cfg), seed=0, std=0.1).eval()


def _run_modes(model, prompts, *, modes, max_new_tokens, block_len, threshold):
    from .decode import generate

    rows, ref = [], None
    generate(model, prompts[:1], mode="ar", max_new_tokens=2)  # warm-up, so the first mode is not penalised
    for mode in modes:
        t0 = time.perf_counter()
        gens = generate(model, prompts, mode=mode, max_new_tokens=max_new_tokens, block_len=block_len,
                        threshold=threshold)
        dt = time.perf_counter() - t0
        toks = [g.tokens for g in gens]
        if mode == "ar":
            ref = toks
        n = sum(len(t) for t in toks)
        nfe = sum(g.nfe for g in gens)
        acc = [a for g in gens for a in g.stats["acceptance"]]
        rows.append({
            "mode": mode, "tokens": n, "nfe": nfe, "tokens_per_forward": n / nfe,
            "tokens_per_s": n / dt, "seconds": dt,
            "mean_acceptance": sum(acc) / len(acc) if acc else None,
            "identical_to_ar": None if ref is None else toks == ref,
            "outputs": toks,
        })
    return rows


def cmd_demo(args: argparse.Namespace) -> int:
    model, tok, label = load_bundled()
    block_len = model.config.block_len if args.block_len is None else args.block_len
    if tok is not None:
        # Prompts end before a newline: the BPE merges a newline with the indentation after it, so a
        # prompt ending in a bare "\n" puts the model off its training distribution.
        texts = args.prompt or [
            "def fibonacci(n):",
            "import os\n\n\ndef list_files(path):",
            "class Stack:\n    def __init__(self):",
            "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"",
        ]
        prompts = [tok.encode(t) for t in texts]
    else:
        texts = None
        prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13]]
    modes = ["ar", "diffusion", "linear", "quadratic"]
    rows = _run_modes(model, prompts, modes=modes, max_new_tokens=args.max_new_tokens, block_len=block_len,
                      threshold=args.threshold)
    if args.json:
        print(json.dumps({"model": label, "block_len": block_len, "batch": len(prompts),
                          "results": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}))
        return 0
    print(f"model: {label}")
    print(f"{len(prompts)} prompts in one batch, greedy, max_new_tokens={args.max_new_tokens}, "
          f"block_len={block_len}, threshold={args.threshold}")
    print(f"{'mode':<10} {'tokens':>6} {'NFE':>5} {'tok/fwd':>8} {'tok/s':>8} {'accept':>7}  identical to AR")
    for r in rows:
        same = "-" if r["identical_to_ar"] is None else ("yes" if r["identical_to_ar"] else "no")
        if r["mode"] == "ar":
            same = "(reference)"
        acc = f"{r['mean_acceptance']:.2f}" if r["mean_acceptance"] else "-"
        print(f"{r['mode']:<10} {r['tokens']:>6} {r['nfe']:>5} {r['tokens_per_forward']:>8.2f} "
              f"{r['tokens_per_s']:>8.1f} {acc:>7}  {same}")
    if tok is not None:
        print("\nfirst prompt, linear mode:")
        print(texts[0] + tok.decode(rows[2]["outputs"][0]))
    print("\n(diffusion mode is not AR-equivalent by design: it commits parallel guesses above the threshold)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .decode import generations, prepare, run
    from .tokenizer import load_tokenizer

    path = BUNDLED if args.model == "bundled" else Path(args.model)
    model = load_model(path, dtype=_dtype(args.dtype), device=args.device)
    tok = load_tokenizer(path)
    if tok is None:
        raise ValueError(f"{path} has no tokenizer.json; `generate` needs one to encode --prompt")
    tok.check_model(model.config)
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tok.encode(text)
    block_len = model.config.block_len if args.block_len is None else args.block_len
    policy = None
    if args.policy == "learned":  # issue 7: the trained unmasking sampler (trimode train-sampler)
        from .decode.learned import LearnedPolicy, load_sampler

        policy = LearnedPolicy(load_sampler(args.sampler or path / "sampler"), args.threshold, args.rule)
    elif args.rule == "joint":
        from .decode.policies import JointThreshold

        policy = JointThreshold(args.threshold)
    mode, cfg, rows = prepare(model, [ids], mode=args.mode, max_new_tokens=args.max_new_tokens,
                              block_len=block_len, threshold=args.threshold, eos_id=tok.eos_id, policy=policy,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              seed=args.seed, acceptance=args.acceptance)
    stream = tok.stream()
    t0 = time.perf_counter()
    for step in run(model, mode, cfg, rows):  # print text as each forward finalises it
        if not args.json and step.new_tokens[0]:
            print(stream.feed(step.new_tokens[0]), end="", flush=True)
    dt = time.perf_counter() - t0
    g = generations(rows, mode)[0]
    out = tok.decode(g.tokens)
    st = g.stats
    if args.json:
        print(json.dumps({"text": out, "tokens": g.tokens, "finish_reason": g.finish_reason, "seconds": dt,
                          "tokens_per_s": len(g.tokens) / dt, "block_len": block_len,
                          **{k: st[k] for k in ("mode", "nfe", "nfe_decode", "tpf", "tpf_decode", "forwards",
                                                "mean_acceptance", "temperature", "seed", "acceptance_rule")}}))
        return 0
    print(stream.flush())
    acc = f", mean acceptance {st['mean_acceptance']:.2f}" if st["mean_acceptance"] else ""
    if st["seed"] is not None:
        rule = f", {st['acceptance_rule']} acceptance" if st["acceptance_rule"] else ""
        acc += f", temperature {st['temperature']:g}, seed {st['seed']}{rule}"
    print(f"\n[{args.mode}] {len(g.tokens)} tokens, {st['nfe']} forwards ({st['tpf']:.2f} tokens/forward, "
          f"{st['tpf_decode']:.2f} without prefill){acc}, {len(g.tokens) / dt:.1f} tokens/s, "
          f"finish: {g.finish_reason}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trimode", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run all four modes on the bundled model and compare them")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--block-len", type=int, default=None, help="default: the model's block_len")
    d.add_argument("--threshold", type=float, default=0.9)
    d.add_argument("--prompt", action="append", help="prompt text (repeatable); default: four code prompts")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_demo)

    g = sub.add_parser("generate", help="decode one prompt in one mode")
    g.add_argument("--model", required=True, help="checkpoint directory (native, NLD or HF), or 'bundled'")
    g.add_argument("--mode", default="ar", choices=[m.value for m in Mode])
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--block-len", type=int, default=None, help="default: the model's block_len")
    g.add_argument("--threshold", type=float, default=0.9)
    g.add_argument("--policy", default="threshold", choices=["threshold", "learned"],
                   help="diffusion unmasking: confidence threshold, or the learned sampler scored against --threshold")
    g.add_argument("--sampler", default=None, help="learned sampler dir (default: MODEL/sampler)")
    g.add_argument("--rule", default="each", choices=["each", "joint"],
                   help="diffusion: fill every slot scoring >= --threshold (each), or the best slots while the "
                        "product of their scores stays >= --threshold (joint)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; see docs/sampling.md")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0: off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random, printed)")
    g.add_argument("--acceptance", default="auto", choices=["auto", "match", "rejection"],
                   help="speculative modes at temperature > 0: rejection sampling where valid (auto), or "
                        "verify-by-sampling (match)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float64 (default: as stored)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_generate)

    for name, (_, help_) in EXTERNAL.items():
        e = sub.add_parser(name, help=help_, add_help=False)
        e.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL:
        module, _ = EXTERNAL[argv[0]]
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"trimode {argv[0]}: not available ({e})", file=sys.stderr)
            return 2
        return int(mod.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ValueError as e:
        print(f"trimode {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
