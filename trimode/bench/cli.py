"""`trimode bench`: every mode measured the same way, speed-of-light, peers, roofline, GPU shapes.

    trimode bench [--model DIR|bundled] [--modes ar,diffusion,linear,quadratic] [--block-lens 4,8,16]
                  [--thresholds 0.9] [--max-new-tokens 64] [--prompts 4] [--batch-size 1] [--json] ...
    trimode bench --synthetic nld-8b --device cuda [--context 1024] [--accept 5.46,6.82]

Prints what the architecture implies (FLOPs and bytes per forward kind, the machine's roofline),
then the measured tables. The full results as JSON: `--json` prints only them (one line, for
scripts), `--out FILE` writes them to FILE besides the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..decode import FORWARD_KINDS
from ..modes import MODE_NAMES
from .suites import CATEGORIES, Prompt

MODES = MODE_NAMES


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _probs(s: str) -> list[float]:
    out = []
    for x in s.split(","):
        if not x.strip():
            continue
        try:
            v = float(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated probabilities, got {s!r}") from None
        if not 0.0 < v < 1.0:
            raise argparse.ArgumentTypeError(f"a depth cut must lie in (0, 1), got {x.strip()!r}")
        out.append(v)
    return out


def _floats(s: str) -> list[float | None]:
    out: list[float | None] = []
    for x in s.split(","):
        x = x.strip()
        if not x:
            continue
        if x.lower() == "none":
            out.append(None)
            continue
        try:
            out.append(float(x))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    return out


def _names(allowed: tuple[str, ...]):
    def parse(s: str) -> list[str]:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return out
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trimode bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled", help="checkpoint directory, 'smollm2' or 'bundled' (default)")
    p.add_argument("--modes", type=_names(MODES), default=list(MODES), help="comma-separated (default: all four)")
    p.add_argument("--block-lens", type=_ints, default=None, help="comma-separated (default: 4,8,16)")
    p.add_argument("--thresholds", type=_floats, default=[0.9], help="diffusion thresholds; 'none' = even schedule")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4, help="prompts per category")
    p.add_argument("--categories", type=_names(CATEGORIES), default=None,
                   help=f"comma-separated from {', '.join(CATEGORIES)} (default: coding, math, domain where the model "
                        "has held-out text, and chat for chat models)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="chat-format prompts (auto: when the tokenizer has a chat template)")
    p.add_argument("--max-prompt-len", type=int, default=256, help="longer prompts keep their last tokens")
    p.add_argument("--domain-prompt-len", type=int, default=96)
    p.add_argument("--domain-files", nargs="*", default=[], help="held-out text files for the domain category")
    p.add_argument("--data", default=None, help="benchmark data directory (default: $TRIMODE_DATA, else "
                                                "../shared/data beside the checkout, else the packaged prompt subset)")
    p.add_argument("--no-sol", action="store_true", help="skip the speed-of-light oracle runs")
    p.add_argument("--no-peers", action="store_true", help="skip transformers generate / prompt lookup")
    p.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens of the peers")
    p.add_argument("--llama-cpp", default="auto",
                   help="llama.cpp peers (llama-cpp-python, greedy and prompt lookup) on this GGUF; 'auto': the GGUF "
                        "the model was converted from, when llama-cpp-python is installed; 'off'")
    p.add_argument("--no-roofline", action="store_true")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed repetitions, interleaved over configurations; each batch's fastest run is kept")
    p.add_argument("--profile", action="store_true", help="torch.profiler: top ops of ar and the best speculative run")
    p.add_argument("--plots", default=None, help="write PNG plots as PREFIX_*.png")
    p.add_argument("--sweep", type=_ints, default=None, help="batch sizes for the ar / speculative crossover sweep")
    p.add_argument("--write-crossover", action="store_true", help="write auto_crossover to MODEL/serving.json")
    p.add_argument("--tree-nodes", type=_ints, default=[],
                   help="linear: also run verify trees of these many draft nodes at every block length")
    p.add_argument("--datastore", choices=["on", "off", "both"], default="on",
                   help="feature-drafter trees: verify the drafter's datastore path (on, the default, when it has "
                        "one), not (off), or run each such configuration both ways (both: labelled no-ds without)")
    p.add_argument("--tree-min-probs", type=_probs, default=[],
                   help="linear feature-drafter trees: also run each tree with these depth cuts (stop drafting "
                        "deeper once no frontier path is that likely), e.g. 0.05,0.1")
    p.add_argument("--write-block-lens", action="store_true",
                   help="write the fastest block length per mode (and per category where it differs) and the "
                        "faster speculative mode to MODEL/decoding.json, which demo, generate and serve read")
    p.add_argument("--synthetic", default=None,
                   help="shape benchmark with random weights: nld-8b, nld-3b, nld-mini, tiny")
    p.add_argument("--context", type=int, default=None, help="synthetic: cached context length")
    p.add_argument("--linear-ks", type=_ints, default=[16, 32])
    p.add_argument("--quadratic-ks", type=_ints, default=[8, 16])
    p.add_argument("--accept", type=_floats, default=[2.0, 3.0, 5.46, 6.82], help="synthetic: acceptance lengths")
    p.add_argument("--device", default="cpu")
    from ..cli import COMPILE_HELP, FEATURE_DRAFTER_HELP, FULL_DRAFT_VOCAB_HELP, QUANTIZE_CHOICES, QUANTIZE_HELP

    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    p.add_argument("--full-draft-vocab", action="store_true", help=FULL_DRAFT_VOCAB_HELP)
    p.add_argument("--feature-drafter", default=None, help=FEATURE_DRAFTER_HELP)
    p.add_argument("--drafters", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="linear drafters to run, comma-separated: adapter, feature (default: both when the model "
                        "has a feature drafter)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | auto (fastest here) (default: stored; synthetic: bf16 on cuda)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: small models on shared cores lose with more)")
    p.add_argument("--json", action="store_true", help="print only the full results, as one JSON line (no tables)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the full results as JSON to FILE")
    return p


def _dtype(name: str | None, device: str = "cpu") -> torch.dtype | None:
    from ..dtypes import parse_dtype

    return parse_dtype(name, device=device, allowed=(torch.float32, torch.bfloat16, torch.float16))


def _say(args: argparse.Namespace, *lines: str) -> None:
    if not args.json:
        for line in lines:
            print(line)


def _progress(args: argparse.Namespace, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=args.json or not sys.stderr.isatty(), file=sys.stderr,
                dynamic_ncols=True)


# -- synthetic ------------------------------------------------------------------------------------
def cmd_synthetic(args: argparse.Namespace) -> int:
    from .roofline import measure_machine
    from .synthetic import run_synthetic

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = "CUDA is not available on this machine; synthetic GPU benchmark skipped"
        print(json.dumps({"synthetic": args.synthetic, "skipped": msg}) if args.json else msg)
        return 0
    dtype = _dtype(args.dtype, args.device) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    machine = None if args.no_roofline else measure_machine(dtype=dtype, device=dev)
    res = run_synthetic(args.synthetic, device=args.device, dtype=dtype, context=args.context,
                        linear_ks=tuple(args.linear_ks), quadratic_ks=tuple(args.quadratic_ks),
                        accept=tuple(a for a in args.accept if a is not None), machine=machine,
                        reps=args.repeats if args.repeats > 1 else None)
    if args.json:
        _emit(args, res)
        return 0
    c = res["config"]
    print(f"synthetic {res['shape']}: {res['parameters'] / 1e9:.2f} B parameters ({c}), {res['dtype']}, "
          f"{res['device']}, batch 1, cached context {res['context']}")
    if machine is not None:
        print(f"machine: matmul {machine.flops_per_s / 1e12:.2f} TFLOP/s, memory {machine.bytes_per_s / 1e9:.1f} GB/s")
    print(f"\n{'forward':<14} {'T':>5} {'logits':>6} {'GFLOP':>9} {'MB':>9} {'ms':>9} {'roofline':>9}")
    for k in res["kinds"]:
        name = k["kind"] if k["kind"] in ("prefill", "ar") else f"{k['kind']} k={k['k']}"
        frac = f"{k['roofline_fraction']:.2f}" if "roofline_fraction" in k else "-"
        print(f"{name:<14} {k['T']:>5} {k['n_logits']:>6} {k['gflops']:>9.2f} {k['mbytes']:>9.1f} {k['ms']:>9.3f} "
              f"{frac:>9}")
    accept = list(res["projection"][0]["tokens_per_s"])
    print("\nprojected decode tokens/s (speed-up vs ar) at acceptance length a:")
    print(f"{'scheme':<16} {'ms/cycle':>9} " + " ".join(f"{'a=' + a:>18}" for a in accept))
    for r in res["projection"]:
        cells = []
        for a in accept:
            v, s = r["tokens_per_s"][a], r["speedup_vs_ar"][a]
            cells.append(f"{'-':>18}" if v is None else f"{v:>10.1f} ({s:4.2f}x)")
        print(f"{r['scheme']:<16} {1e3 * r['forward_s']:>9.3f} " + " ".join(cells))
    _emit(args, res)
    return 0


# -- model benchmark --------------------------------------------------------------------------------
def load(args: argparse.Namespace):
    from ..checkpoint import load_model
    from ..models import for_inference, resolve_model
    from ..tokenizer import load_tokenizer

    path = resolve_model(args.model)
    args.model_path = path
    model = for_inference(load_model(path, dtype=_dtype(args.dtype, args.device), device=args.device,
                                     quantize=args.quantize), draft_vocab=not args.full_draft_vocab,
                          feature_drafter=args.feature_drafter)
    if args.compile:
        model.compile_decode()  # compiled during the warm-up, before anything is timed
    tok = load_tokenizer(path)
    if tok is not None:
        tok.check_model(model.config)
    return path, model, tok


def make_suites(args: argparse.Namespace, path: Path, model, tok) -> tuple[dict[str, list[Prompt]], bool]:
    from .suites import build_suites, synthetic_suites

    if tok is None:
        c = model.config
        avoid = [t for t in (c.mask_token_id, c.eos_token_id) if t is not None]
        return synthetic_suites(c.vocab_size, n=args.prompts, avoid=avoid), False
    chat = {"on": True, "off": False, "auto": tok.chat_template is not None}[args.chat]
    suites = build_suites(tok, n=args.prompts, categories=args.categories, chat=chat, model_dir=path,
                          domain_files=[Path(f) for f in args.domain_files],
                          data=Path(args.data) if args.data else None, max_prompt_len=args.max_prompt_len,
                          domain_prompt_len=args.domain_prompt_len, new_tokens=args.max_new_tokens)
    return suites, chat


def make_configs(args: argparse.Namespace, model) -> list:
    from .runner import Config

    ks = args.block_lens or [4, 8, 16]
    if any(k < 1 for k in ks):
        raise ValueError(f"block lengths must be >= 1, got {ks}")
    configs = [Config("ar")]
    drafters = linear_drafters(args, model)
    if getattr(args, "tree_min_probs", None) and ("linear" not in args.modes or "feature" not in drafters
                                                   or not args.tree_nodes):
        raise ValueError("--tree-min-probs cuts feature-drafter trees: it needs --modes linear, the feature "
                         "drafter and --tree-nodes")
    for k in ks:
        if "diffusion" in args.modes:
            configs += [Config("diffusion", k, t) for t in args.thresholds]
        if not args.no_sol and "diffusion" in args.modes:
            configs.append(Config("diffusion", k, None, policy="oracle"))
        for m in ("linear", "quadratic"):
            if m in args.modes:
                configs += [Config(m, k, drafter=d) for d in (drafters if m == "linear" else ["auto"])]
        if "linear" in args.modes and k > 2:
            room = sum(3 ** d for d in range(1, k))  # nodes a tree of branch 3 can hold over k - 1 slots
            configs += [Config("linear", k, tree_nodes=n, drafter=d) for d in drafters
                        for n in args.tree_nodes if k - 1 < n <= room]
            configs += [Config("linear", k, tree_nodes=n, drafter="feature", tree_min_prob=pm)
                        for pm in args.tree_min_probs if pm and "feature" in drafters
                        for n in args.tree_nodes if k - 1 < n <= room]
    ds = getattr(args, "datastore", "on")
    if ds != "on" and getattr(getattr(model, "feature_drafter", None), "datastore", None) is not None:
        import dataclasses

        tagged = [c for c in configs if c.mode == "linear" and c.drafter == "feature" and c.tree_nodes]
        if ds == "off":
            configs = [dataclasses.replace(c, datastore=False) if c in tagged else c for c in configs]
        else:
            configs += [dataclasses.replace(c, datastore=False) for c in tagged]
    return configs


def linear_drafters(args: argparse.Namespace, model) -> list[str]:
    """The linear drafters to run: --drafters, else both when the model has a feature drafter."""
    has = getattr(model, "feature_drafter", None) is not None
    want = args.drafters or (["adapter", "feature"] if has else ["adapter"])
    bad = [d for d in want if d not in ("adapter", "feature")]
    if bad:
        raise ValueError(f"--drafters: unknown drafter {bad[0]!r}; choose adapter, feature")
    if "feature" in want and not has:
        raise ValueError("--drafters feature: this model has no feature drafter (pass --feature-drafter DIR)")
    return want


def run_all(args, model, suites, configs, *, eos_id, peers_on: bool):
    """Every configuration (and peer) on every batch, interleaved at the finest grain: for each batch,
    all configurations back to back, `repeats` times over the suite; each batch's fastest run is kept.
    The load on a shared machine drifts over seconds, so configurations compared side by side on the
    same batch within seconds of each other see the same conditions."""
    from .peers import PeerResult, fastest_peer, hf_generate, hf_model, logits_diff
    from .runner import RunResult, batches, decode_batch, fastest, warm_up
    from .timing import TimedModel

    allp = [p for ps in suites.values() for p in ps]
    warm_up(model, allp[0], configs, eos_id=eos_id)
    peer_info: dict = {}
    hf = None
    if peers_on and getattr(model, "quantization", None):
        peer_info["skipped"] = "transformers peers skipped: they would run other (unquantized) weights"
    elif peers_on:
        try:
            hf = hf_model(model)
        except ImportError as e:
            peer_info["skipped"] = f"transformers not installed ({e})"
        if hf is not None:
            peer_info["logits_max_abs_diff"] = logits_diff(model, hf, allp[0].tokens)
            hf_generate(hf, allp[:1], max_new_tokens=4, eos_id=eos_id)  # warm-up
            hf_generate(hf, allp[:1], max_new_tokens=4, eos_id=eos_id, lookup=args.lookup)
    peer_names = [("hf generate", None), (f"hf prompt-lookup {args.lookup}", args.lookup)] if hf is not None else []
    llamas = []
    if peers_on:
        from .llamacpp import LlamaCppPeer, resolve

        gguf, why = resolve(getattr(args, "llama_cpp", "auto"), getattr(args, "model_path", None))
        peer_info["llama_cpp"] = why
        if gguf is not None:
            n_ctx = max(len(p.tokens) for p in allp) + args.max_new_tokens + 16
            llamas = [LlamaCppPeer(gguf, n_ctx=n_ctx, threads=torch.get_num_threads(), lookup=k)
                      for k in (None, args.lookup)]
            for lp in llamas:  # warm-up
                lp.generate(allp[:1], max_new_tokens=4, eos_id=eos_id)
    R = args.repeats
    done = {cfg.label: [RunResult(cfg) for _ in range(R)] for cfg in configs}
    peer_runs = {name: [PeerResult(name, 0, 0.0, {}) for _ in range(R)]
                 for name in [n for n, _ in peer_names] + [lp.name for lp in llamas]}
    reference: dict[str, list[int]] = {}
    timed = TimedModel(model)
    todo = [(cat, b) for cat, ps in suites.items() for b in batches(ps, args.batch_size)]
    bar = _progress(args, R * len(todo), "bench")
    for rep in range(R):
        for cat, batch in todo:
            for cfg in configs:  # ar first: it is the reference of the oracle runs that follow
                ref = [reference[p.source] for p in batch] if cfg.policy == "oracle" else None
                rows, calls, s = decode_batch(timed, batch, cfg, max_new_tokens=args.max_new_tokens, eos_id=eos_id,
                                              reference=ref)
                done[cfg.label][rep].add(cat, rows, calls, s)
                if cfg.mode == "ar" and rep == 0:
                    reference.update({r.prompt.source: r.tokens for r in rows})
            timed.calls.clear()
            for name, lookup in peer_names:  # peers run at batch 1, on the same prompts
                acc = peer_runs[name][rep]
                r = hf_generate(hf, batch, max_new_tokens=args.max_new_tokens, eos_id=eos_id, lookup=lookup, name=name)
                acc.merge(r)
            for lp in llamas:  # llama.cpp on the GGUF the model came from, same prompt ids
                peer_runs[lp.name][rep].merge(lp.generate(batch, max_new_tokens=args.max_new_tokens, eos_id=eos_id,
                                                          stop=getattr(args, "stop_ids", ())))
            bar.update()
    bar.close()
    best = {label: fastest(rs) for label, rs in done.items()}
    peers_best = {name: fastest_peer(rs) for name, rs in peer_runs.items()}
    return best, peers_best, peer_info, reference


def profile_top(model, prompts, configs, *, max_new_tokens: int, eos_id, top: int = 12) -> dict:
    """torch.profiler over one decode per configuration: the ops that take the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from .runner import decode_batch
    from .timing import TimedModel

    out = {}
    for cfg in configs:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            decode_batch(TimedModel(model), prompts, cfg, max_new_tokens=max_new_tokens, eos_id=eos_id)
            wall = time.perf_counter() - t0
        ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ev) / 1e6
        out[cfg.label] = {"wall_s": wall, "profiled_self_cpu_s": total, "top": [
            {"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
             "share": (e.self_cpu_time_total / 1e6) / total if total else None} for e in ev[:top]]}
    return out


def _agreement(outputs: dict[str, list[int]], reference: dict[str, list[int]]) -> float:
    """Share of the reference's tokens a peer reproduced before its first difference, over all prompts."""
    same = total = 0
    for s, ref in reference.items():
        out = outputs.get(s, [])
        n = min(len(out), len(ref))
        same += next((i for i in range(n) if out[i] != ref[i]), n)
        total += len(ref)
    return same / total if total else 1.0


def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_report(args, out: dict, configs) -> None:
    runs = out["runs"]
    ar = runs[0]
    peers = {p["name"]: p for p in out.get("peers", [])}
    print(f"\nmeasured: {out['prompts']} prompts ({', '.join(f'{k} {v}' for k, v in out['categories'].items())}), "
          f"max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, greedy, {out['threads']} thread(s), "
          f"interleaved per batch, each batch's fastest of {args.repeats} repeat(s)")
    hdr = (f"{'config':<24} {'tokens':>6} {'NFE':>5} {'tpf':>5} {'tpf_dec':>7} {'accept':>6} {'tok/s':>7} "
           f"{'vs ar':>6}")
    for name in peers:
        hdr += f" {'vs ' + name.replace('hf prompt-lookup', 'hf lookup'):>14}"
    hdr += f" {'overhead':>8} {'ident':>5} {'agree':>5}"
    print(hdr)
    for r in runs:
        line = (f"{r['config']:<24} {r['tokens']:>6} {r['nfe']:>5} {r['tpf']:>5.2f} {r['tpf_decode']:>7.2f} "
                f"{_fmt(r['mean_acceptance']):>6} {r['tokens_per_s']:>7.1f} {r['vs_ar']:>6.2f}")
        for name in peers:
            line += f" {r['vs_peers'][name]:>14.2f}"
        line += (f" {_fmt(r['overhead_fraction'], '.0%'):>8} {_fmt(r.get('identical_to_ar'), '.2f'):>5} "
                 f"{_fmt(r.get('agreement_with_ar'), '.2f'):>5}")
        print(line)
    for name, p in peers.items():
        print(f"{name:<24} {p['tokens']:>6} {p['forwards']:>5} {_fmt(p['tpf']):>5} {'':>7} {'':>6} "
              f"{p['tokens_per_s']:>7.1f} "
              f"{p['tokens_per_s'] / ar['tokens_per_s']:>6.2f}   identical to our ar: {p['identical_to_ar']:.2f}, "
              f"agreement {p.get('agreement_with_ar', 0):.2f}")
    if "llama_cpp" in out.get("peer_check", {}) and not any(n.startswith("llama.cpp") for n in peers):
        print(f"llama.cpp peers skipped: {out['peer_check']['llama_cpp']}")
    if "logits_max_abs_diff" in out.get("peer_check", {}):
        print(f"(transformers model built from our weights: max |logits diff| = "
              f"{out['peer_check']['logits_max_abs_diff']:.2e})")
    print("(tpf: tokens per forward with prefill; tpf_dec: without; accept: mean acceptance length incl. bonus; "
          "overhead: share of wall time outside model forwards; ident / agree: identical to / token agreement "
          "with ar)")

    cats = list(out["categories"])
    print("\ntokens per forward by category (prefill included)")
    print(f"{'config':<24} " + " ".join(f"{c:>8}" for c in cats))
    for r in runs:
        print(f"{r['config']:<24} " + " ".join(f"{r['categories'][c]['tpf']:>8.3f}" for c in cats))

    spec = [r for r in runs if r.get("conditional_acceptance")]
    if spec:
        print("\nspeculative: acceptance-length histogram and per-position conditional acceptance")
        for r in spec:
            h = " ".join(f"{k}:{v}" for k, v in r["acceptance_hist"].items())
            ca = " ".join(_fmt(x, ".2f") for x in r["conditional_acceptance"][:8])
            print(f"{r['config']:<24} hist {h:<36} P(i | <i) {ca}")
    print("\nper-step committed-token histogram (forwards that can finalise tokens)")
    for r in runs:
        print(f"{r['config']:<24} " + " ".join(f"{k}:{v}" for k, v in r["step_hist"].items()))

    print("\ntime per forward kind (ms) and fraction of the roofline bound reached")
    kinds = [k for k in FORWARD_KINDS if any(k in r["kinds"] for r in runs)]
    print(f"{'config':<24} " + " ".join(f"{k:>17}" for k in kinds))
    for r in runs:
        cells = []
        for k in kinds:
            v = r["kinds"].get(k)
            cells.append(f"{'-':>17}" if v is None else
                         f"{v['ms_per_forward']:>8.2f} ({_fmt(v.get('roofline_fraction'), '.0%')})".rjust(17))
        print(f"{r['config']:<24} " + " ".join(cells))
    if out.get("profile"):
        print("\nprofile (torch.profiler, self CPU time; one decode of the first prompt)")
        for label, p in out["profile"].items():
            print(f"{label}: wall {p['wall_s']:.3f} s")
            for e in p["top"][:8]:
                print(f"    {e['op']:<40} {e['calls']:>6} calls {e['self_cpu_s'] * 1e3:>8.1f} ms "
                      f"{_fmt(e['share'], '.0%'):>5}")
    if out.get("sweep"):
        sw = out["sweep"]
        print(f"\nbatch-size sweep: ar vs {sw['spec']} (tokens/s)")
        print(f"{'batch':>5} {'ar':>9} {'spec':>9} {'ratio':>6}")
        for r in sw["rows"]:
            print(f"{r['batch']:>5} {r['ar_tokens_per_s']:>9.1f} {r['spec_tokens_per_s']:>9.1f} {r['ratio']:>6.2f}")
        where = f" (written to {sw['written']})" if sw.get("written") else ""
        print(f"auto_crossover = {sw['auto_crossover']}{where}")


def architecture_lines(model, machine, *, context: int, ks: list[int], bpw: int) -> list[str]:
    from .roofline import bound_seconds, forward_cost, nominal_kinds

    c = model.config
    lines = [f"architecture: {c.num_parameters() / 1e6:.2f} M parameters, {c.num_layers} layers, hidden "
             f"{c.hidden_size}, vocab {c.vocab_size}, {bpw} bytes/weight"]
    if machine is not None:
        lines.append(f"machine: matmul {machine.flops_per_s / 1e9:.1f} GFLOP/s ({machine.dtype}), memory copy "
                     f"{machine.bytes_per_s / 1e9:.2f} GB/s, ridge {machine.flops_per_s / machine.bytes_per_s:.1f} "
                     f"FLOP/byte")
    lines.append(f"per forward at batch 1, context {context}:")
    lines.append(f"  {'kind':<16} {'T':>5} {'MFLOP':>9} {'MB':>8} {'FLOP/B':>7} {'bound ms':>9}")
    seen = set()
    for k in ks:
        for kind, (T, n) in nominal_kinds(k, context=context).items():
            key = (kind, T)
            if key in seen:
                continue
            seen.add(key)
            f, b = forward_cost(c, B=1, T=T, S=context + T, n_logits=n, bytes_per_weight=bpw)
            bound = f"{1e3 * bound_seconds(f, b, machine):>9.3f}" if machine is not None else f"{'-':>9}"
            name = kind if kind in ("prefill", "ar") else f"{kind} k={k}"
            lines.append(f"  {name:<16} {T:>5} {f / 1e6:>9.2f} {b / 2**20:>8.2f} {f / b:>7.1f} {bound}")
    return lines


def cmd_model(args: argparse.Namespace) -> int:
    from .metrics import summarize
    from .roofline import measure_machine
    from .sweep import crossover, sweep, write_serving

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        msg = "CUDA is not available on this machine; benchmark skipped"
        print(json.dumps({"skipped": msg}) if args.json else msg)
        return 0
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        raise ValueError("--batch-size, --max-new-tokens and --repeats must be >= 1")
    path, model, tok = load(args)
    c = model.config
    eos_id = tok.eos_id if tok is not None else c.eos_token_id
    suites, chat = make_suites(args, path, model, tok)
    configs = make_configs(args, model)
    bpw = torch.finfo(model.dtype).bits // 8
    machine = None if args.no_roofline else measure_machine(dtype=model.dtype, device=model.device)
    allp = [p for ps in suites.values() for p in ps]
    ctx = round(sum(len(p.tokens) for p in allp) / len(allp))
    label = "bundled" if args.model == "bundled" else str(args.model)
    dv = getattr(model, "draft_vocab", None)
    dv_text = "whole vocabulary" if dv is None else f"{dv.numel()} ids + each row's own tokens"
    fd = getattr(model, "feature_drafter", None)
    if fd is not None:
        dv_text += (f" (the adapter); feature drafter: {sum(p.numel() for p in fd.parameters()):,} parameters, "
                    f"{fd.ids.numel()} ids + each row's own tokens")
    _say(args, f"model: {label} ({model.dtype}, {model.device}); prompts: "
               f"{'chat-formatted' if chat else 'raw'}; threads {torch.get_num_threads()}; drafts over: {dv_text}",
         *architecture_lines(model, machine, context=ctx, ks=args.block_lens or [4, 8, 16], bpw=bpw))
    best, peers_best, peer_info, reference = run_all(args, model, suites, configs, eos_id=eos_id,
                                                     peers_on=not args.no_peers and tok is not None)
    runs = [summarize(best[cfg.label], c, bytes_per_weight=bpw, machine=machine, reference=reference)
            for cfg in configs]
    ar_tps = runs[0]["tokens_per_s"]
    peers = [{"name": n, "tokens": p.tokens, "seconds": p.seconds, "tokens_per_s": p.tokens_per_s,
              "forwards": p.forwards, "tpf": p.tokens / p.forwards if p.forwards else None,
              "identical_to_ar": sum(p.outputs[s] == reference[s] for s in reference) / len(reference),
              "agreement_with_ar": _agreement(p.outputs, reference)}
             for n, p in peers_best.items()]
    for r in runs:
        r["vs_ar"] = r["tokens_per_s"] / ar_tps
        r["vs_peers"] = {p["name"]: r["tokens_per_s"] / p["tokens_per_s"] for p in peers}
    spec_runs = [r for r in runs if r["mode"] in ("linear", "quadratic")]
    best_spec = max(spec_runs, key=lambda r: r["tokens_per_s"]) if spec_runs else None
    out = {
        "model": label, "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
        "threads": torch.get_num_threads(), "chat": chat, "batch_size": args.batch_size,
        "draft_vocab": None if dv is None else int(dv.numel()),
        "feature_drafter": None if fd is None else {"parameters": sum(p.numel() for p in fd.parameters()),
                                                    "vocab": int(fd.ids.numel()), **fd.meta},
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "prompts": len(allp),
        "categories": {k: len(v) for k, v in suites.items()},
        "machine": machine.as_dict() if machine is not None else None,
        "runs": runs, "peers": peers, "peer_check": peer_info,
        "best_speculative": None if best_spec is None else {
            "config": best_spec["config"], "tokens_per_s": best_spec["tokens_per_s"], "vs_ar": best_spec["vs_ar"],
            "vs_peers": best_spec["vs_peers"], "identical_to_ar": best_spec.get("identical_to_ar")},
    }
    if args.profile:
        prof_cfgs = [configs[0]] + [cf for cf in configs if best_spec and cf.label == best_spec["config"]]
        out["profile"] = profile_top(model, allp[:1], prof_cfgs, max_new_tokens=args.max_new_tokens, eos_id=eos_id)
    if args.sweep:
        if best_spec is None:
            raise ValueError("--sweep needs a speculative mode (linear or quadratic) in --modes")
        spec_cfg = next(cf for cf in configs if cf.label == best_spec["config"])
        bar = _progress(args, len(args.sweep) * 2 * args.repeats, "sweep")
        rows = sweep(model, allp, spec_cfg, args.sweep, max_new_tokens=args.max_new_tokens, eos_id=eos_id,
                     repeats=args.repeats, progress=bar.update)
        bar.close()
        sw = {"spec": spec_cfg.label, "mode": spec_cfg.mode, "block_len": spec_cfg.block_len, "rows": rows,
              "auto_crossover": crossover(rows)}
        if args.write_crossover:
            written = write_serving(path, {
                "auto_crossover": sw["auto_crossover"], "speculative_mode": spec_cfg.mode,
                "block_len": spec_cfg.block_len, "measured_batch_sizes": args.sweep,
                "device": str(model.device), "threads": torch.get_num_threads(),
                "max_new_tokens": args.max_new_tokens,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": "trimode bench --sweep",
            })
            sw["written"] = str(written)
        out["sweep"] = sw
    if args.write_block_lens:
        from ..models import choose_block_lens, write_decoding

        info = choose_block_lens(runs)
        if not info["block_len"]:
            raise ValueError("--write-block-lens needs diffusion, linear or quadratic runs")
        info["measured"] = {"dtype": out["dtype"], "device": out["device"], "threads": out["threads"],
                            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                            "prompts": out["categories"], "repeats": args.repeats,
                            "load_average": list(__import__("os").getloadavg()),
                            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "source": "trimode bench --write-block-lens"}
        out["decoding"] = {**info, "written": str(write_decoding(path, info))}
    if args.plots:
        out["plots"] = [str(p) for p in __import__("trimode.bench.plots", fromlist=["write_plots"]).write_plots(
            out, args.plots)]
    if not args.json:
        print_report(args, out, configs)
        if out.get("decoding"):
            dd = out["decoding"]
            print(f"\nbest block length per mode: {dd['block_len']} (faster speculative mode: "
                  f"{dd.get('speculative_mode')}; per category where different: {dd['by_category'] or 'none'}); "
                  f"written to {dd['written']}")
        if out.get("plots"):
            print("plots: " + ", ".join(out["plots"]))
    _emit(args, out)
    return 0


def _emit(args: argparse.Namespace, result: dict) -> None:
    """The full results as JSON: the only output with --json, written to --out FILE when given."""
    if args.json:
        print(json.dumps(result))
    if args.out:
        from .._io import write_text_atomic

        write_text_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")
        if not args.json:
            print(f"results: {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    threads = torch.get_num_threads()
    if args.threads < 1:
        print("trimode bench: error: --threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        return cmd_synthetic(args) if args.synthetic else cmd_model(args)
    except ValueError as e:
        if "TRIMODE_DEBUG" in __import__("os").environ:
            raise
        print(f"trimode bench: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main())
