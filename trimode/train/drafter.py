"""`trimode train-drafter`: the LoRA drafter, trained by self-distillation (docs/design-notes.md §6).

The draft pass of linear self-speculation runs the canvas [x_t, MASK x (K-1)] at positions
t .. t+K-1 bidirectionally against the causal cache of x_0 .. x_{t-1}, with the adapter "draft" on;
the verifier then accepts the longest prefix of drafts equal to its own greedy tokens. So the
drafter should predict the model's own AR greedy continuation. Recipe:

1. generate the model's AR greedy continuations of training prompts (base weights);
2. freeze the base weights, attach a LoRA "draft" (NLD: o_proj, r = 128, alpha = 512; here scaled
   to the model, r = hidden / 16 capped at 128, alpha = 4 r);
3. train with one batched forward per micro-batch over [x ; block_1 ; ... ; block_n]: the clean
   sequence x runs causally (it is exactly what the cache holds at inference), and each draft block
   [x_t, MASK x (K-1)] at positions t .. t+K-1 sees its own block bidirectionally and the clean
   tokens before t (`draft_training_mask`). Many blocks per sequence, at arbitrary anchors t (at
   inference a draft starts wherever the last acceptance ended). The adapter acts on block tokens
   only (`adapter_tokens`); the anchor x_t is adapted in half of the blocks, because linear drafts
   adapt it and quadratic ones (where it is a verified head) do not;
4. loss = CE(draft logits, AR greedy token) + kl_weight * KL(p_verify || p_draft), the verifier's
   distribution being the clean stream of the same forward (base weights: the adapter is off there
   and clean tokens never see block tokens). NLD reportedly uses lambda_L = 1, lambda_K = 0.5;
5. save the adapter in PEFT format where `load_model` finds it: `DIR/adapters/draft/` for a native
   checkpoint, `DIR/linear_spec_lora/` for an NLD one (or `--out`). A model inside the installed
   package (`--model bundled`) is never written to by default: the adapter goes to
   `$TRIMODE_CACHE/trained/bundled/draft` (cache root as `trimode.models.cache_root`); only an
   explicit `--out` writes into the package.

The output directory is checked for writability before the model is loaded; SIGTERM / Ctrl-C stop
training after the current step with the adapter and trainer state written (exit 0), and running the
same command again resumes bit-identically.

The verifier never sees the adapter, so greedy output stays identical to AR whatever it learns.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import check_writable_dir, load_state, os_error_message
from .distill import TRAIN_SOURCES, Sequences, ar_continuations, sample_anchors, train_prompts
from .draft_objective import DRAFT, drafter_loss


# -- training --------------------------------------------------------------------------------
@dataclass
class DrafterConfig:
    model: str
    out: str | None = None
    targets: tuple[str, ...] = ("o_proj",)
    rank: int | None = None  # default: hidden / 16, in [4, 128]
    alpha: float | None = None  # default: 4 * rank (NLD: 512 / 128)
    block_lens: tuple[int, ...] = (8,)
    steps: int = 200
    batch: int = 8
    blocks_per_seq: int = 32
    lr: float = 2e-3
    warmup: int = 10
    kl_weight: float = 0.5
    ce_weight: float = 1.0
    prompts: tuple[str, ...] = ()
    n_prompts: int = 256
    prompt_len: int = 64
    new_tokens: int = 64
    gen_batch: int = 32
    bf16: bool = False  # fp32 measured faster than bf16 autocast for the 6.8M model on this CPU
    seed: int = 0
    dtype: str = "float32"
    gen_dtype: str | None = None  # dtype of the model that writes the AR targets (default: dtype)
    log_every: int = 10
    data_cache: str | None = None  # a .pt of the AR continuations, reused when it exists
    save_every: int = 50  # write the adapter + trainer state every N steps (0: only at the end)
    resume: bool = True  # continue from OUT/trainer_state.pt when an interrupted run left one
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda: where the model trains and generates
    init_adapter: str | None = None  # start from this adapter's weights (its targets, rank, alpha)
    draft_vocab: int = 0  # > 0: also write a draft vocabulary of this many ids (trimode.draftvocab)
    extra: dict[str, Any] = field(default_factory=dict)


def reinit_adapter(model: torch.nn.Module, name: str, *, seed: int) -> None:
    """Seeded LoRA init (A ~ kaiming-uniform, B = 0) from a private generator: no global RNG touched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod_name, p in model.named_parameters():
            if f".adapters.{name}.A" in mod_name:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif f".adapters.{name}.B" in mod_name:
                p.zero_()


def init_from_adapter(model: torch.nn.Module, path: Path, cfg: DrafterConfig
                      ) -> tuple[tuple[str, ...], int, float, str]:
    """Attach the adapter in `path` as the draft adapter to train further (a warm start: fresh optimizer
    and schedule). Its targets, rank and alpha are the run's; --targets/--rank/--alpha, when given,
    must agree. Returns (targets, rank, alpha, sha256 of its weights) for the resume check."""
    import hashlib

    from ..peft import ADAPTER_WEIGHTS, load_adapter, read_adapter_config

    if not path.is_dir():
        raise ValueError(f"--init-adapter {path} is not a directory")
    acfg = read_adapter_config(path)
    rank, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    targets = acfg.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"--init-adapter {path}: target_modules must be a list of names, got {targets!r}")
    targets = tuple(sorted(targets))
    given = tuple(sorted(cfg.targets))
    if given != ("o_proj",) and given != targets:  # o_proj: the flag's default, i.e. not given
        raise ValueError(f"--targets {','.join(cfg.targets)} differ from --init-adapter's {','.join(targets)}")
    for flag, mine, theirs in (("--rank", cfg.rank, rank), ("--alpha", cfg.alpha, alpha)):
        if mine is not None and float(mine) != float(theirs):
            raise ValueError(f"{flag} {mine:g} differs from --init-adapter's {theirs:g}")
    load_adapter(model, path, name=DRAFT)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    with torch.no_grad():  # train in the model's dtype, whatever the file stored
        for n, p in model.named_parameters():
            if f".adapters.{DRAFT}." in n and p.dtype != dtype:
                p.data = p.data.to(dtype)
    sha = hashlib.sha256((path / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    return targets, rank, alpha, sha


def default_rank(hidden: int) -> int:
    return int(max(4, min(128, hidden // 16)))


PACKAGE = Path(__file__).resolve().parents[1]  # the installed trimode package


def package_model_output(model_dir: Path, leaf: str) -> Path | None:
    """For a model shipped inside the installed package (e.g. `bundled`): the user directory that
    takes what training writes for it by default (`cache_root()/trained/<model>/<leaf>`), so a
    default run never changes the package (and with it later `demo` / `serve` runs). None for any
    other model directory."""
    from ..models import cache_root

    try:
        rel = model_dir.resolve().relative_to(PACKAGE)
    except ValueError:
        return None
    name = rel.relative_to("assets") if rel.parts[:1] == ("assets",) else rel
    return cache_root() / "trained" / name / leaf


def default_out(model_dir: Path) -> Path:
    """Where load_model(model_dir) finds a "draft" adapter; for a model inside the package, a user
    directory instead (`package_model_output`)."""
    from ..checkpoint import ADAPTERS_DIR, NLD_ADAPTER_DIR

    user = package_model_output(model_dir, DRAFT)
    if user is not None:
        return user
    raw = json.loads((model_dir / "config.json").read_text())
    if raw.get("model_type") == "trimode":
        return model_dir / ADAPTERS_DIR / DRAFT
    if raw.get("model_type") == "nemotron_labs_diffusion":
        return model_dir / NLD_ADAPTER_DIR
    raise ValueError(f"{model_dir} is neither a native nor an NLD checkpoint: pass --out for the adapter")


def resolve_model_dir(path: str) -> Path:
    """A model directory, a training run (its latest checkpoint) or 'bundled'."""
    if path == "bundled":
        return Path(__file__).resolve().parents[1] / "assets" / "bundled"
    p = Path(path)
    if not (p / "config.json").exists() and (p / "checkpoints" / "latest").exists():
        from .checkpointing import latest_checkpoint

        found = latest_checkpoint(p)
        if found is not None:
            return found
    if not (p / "config.json").exists():
        raise ValueError(f"{p} is not a checkpoint directory (no config.json)")
    return p


STATE = "trainer_state.pt"


def fit_drafter(model: torch.nn.Module, seqs: Sequences, cfg: DrafterConfig, *,
                params: list[torch.nn.Parameter], log=print, state: dict[str, Any] | None = None,
                checkpoint=None, stop=None) -> list[dict[str, Any]]:
    """Train `params` (the draft LoRA) on the self-distillation sequences; returns the step log.

    state: a dict written earlier through `checkpoint` (every cfg.save_every steps): training goes
    on from its step with the same weights, optimizer moments, data order and random stream, so a
    resumed run ends bit-identical to an uninterrupted one.
    stop: a `loop.StopSignals`; once it holds a signal, training stops before the next step and
    (with `checkpoint`) writes the state of the last finished one, so the history ends early."""
    N = seqs.tokens.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    history: list[dict[str, Any]] = []
    order = torch.randperm(N, generator=gen).tolist()
    pos, first = 0, 1
    saved = 0  # the step the last checkpoint holds
    if state is not None:
        with torch.no_grad():
            for p, v in zip(params, state["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        order, pos, first = list(state["order"]), int(state["pos"]), int(state["step"]) + 1
        history = list(state["history"])
        saved = first - 1
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)

    def snapshot(step: int) -> dict[str, Any]:
        return {"step": step, "params": [p.detach().clone() for p in params], "opt": opt.state_dict(),
                "gen": gen.get_state(), "order": order, "pos": pos, "history": history}

    for step in range(first, cfg.steps + 1):
        if stop is not None and stop.name:  # SIGTERM / Ctrl-C: the previous step is the last one
            if checkpoint is not None and step - 1 > saved:
                checkpoint(snapshot(step - 1))
            break
        lr = cfg.lr * min(1.0, step / max(1, cfg.warmup)) * (0.5 * (1 + math.cos(math.pi * (step - 1) / cfg.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + cfg.batch > N:
            order, pos = torch.randperm(N, generator=gen).tolist(), 0
        rows = order[pos:pos + cfg.batch]
        pos += cfg.batch
        K = cfg.block_lens[int(torch.randint(len(cfg.block_lens), (1,), generator=gen))]
        L = int(seqs.lengths[rows].max())
        x, valid = seqs.tokens[rows, :L], seqs.valid[rows, :L]
        anchors = sample_anchors(seqs, rows, cfg.blocks_per_seq, K, gen)
        adapt_anchor = torch.rand(anchors.shape, generator=gen) < 0.5
        dev = next(model.parameters()).device
        x, valid, anchors, adapt_anchor = x.to(dev), valid.to(dev), anchors.to(dev), adapt_anchor.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, info = drafter_loss(model, x, valid, anchors, K, kl_weight=cfg.kl_weight,
                                      ce_weight=cfg.ce_weight, adapt_anchor=adapt_anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step, "loss": float(loss.detach()), "K": K, "lr": lr,
               "seconds": time.perf_counter() - t0, **info}
        history.append(rec)
        if checkpoint is not None and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            checkpoint(snapshot(step))
            saved = step
        if step % cfg.log_every == 0 or step == 1 or step == cfg.steps:
            log(f"step {step:>5}  loss {rec['loss']:.4f}  ce {info['ce']:.4f}  kl {info['kl']:.4f}  "
                f"top1 {info['acc1']:.3f}  accepted/block {info['accepted']:.2f}  K {K}  "
                f"{rec['seconds']:.0f}s")
    return history


def train_drafter(cfg: DrafterConfig, *, log=print) -> dict[str, Any]:
    from ..checkpoint import load_model
    from ..peft import save_adapter
    from ..tokenizer import load_tokenizer

    bad = [f"{k} must be >= {lo}, got {v}" for k, v, lo in (
        ("--steps", cfg.steps, 1), ("--batch", cfg.batch, 1), ("--blocks-per-seq", cfg.blocks_per_seq, 1),
        ("--save-every", cfg.save_every, 0), ("--n-prompts", cfg.n_prompts, 1), ("--new-tokens", cfg.new_tokens, 1),
        ("--rank", cfg.rank if cfg.rank is not None else 1, 1), ("--block-len", min(cfg.block_lens or (0,)), 2),
        ("--draft-vocab", cfg.draft_vocab, 0))
        if v < lo]
    if not cfg.lr > 0:
        bad.append(f"--lr must be > 0, got {cfg.lr}")
    if bad:
        raise ValueError("; ".join(bad))
    mdir = resolve_model_dir(cfg.model)
    out = Path(cfg.out) if cfg.out else default_out(mdir)
    check_writable_dir(out, "adapter output directory")  # before loading, generating or training
    if cfg.data_cache and not Path(cfg.data_cache).exists():
        check_writable_dir(Path(cfg.data_cache).parent, "--data-cache directory")
    if not cfg.out and package_model_output(mdir, DRAFT) is not None:
        log(f"note: {mdir} is inside the installed package, which a default run never changes: the adapter goes "
            f"to {out} (choose with --out; --out {mdir / 'adapters' / DRAFT} would make `trimode demo/serve` load it)")
    model = load_model(mdir, dtype=getattr(torch, cfg.dtype))
    tok = load_tokenizer(mdir)
    if tok is None:
        raise ValueError(f"{mdir} has no tokenizer")
    c = model.config
    if c.mask_token_id is None:
        raise ValueError("the model has no mask token: it cannot draft")
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_draft_vocab(None)  # a loaded drafter's token subset is not the new adapter's
    if DRAFT in model.adapter_names():
        log(f"note: {mdir} already has a draft adapter; training a {'new' if cfg.init_adapter else 'fresh'} "
            "one in its place")
    if cfg.init_adapter:
        targets, rank, alpha, init_sha = init_from_adapter(model, Path(cfg.init_adapter), cfg)
        log(f"initialised the draft adapter from {cfg.init_adapter}")
    else:
        targets, init_sha = tuple(cfg.targets), None
        rank = cfg.rank or default_rank(c.hidden_size)
        alpha = cfg.alpha if cfg.alpha is not None else 4.0 * rank
        model.add_adapter(DRAFT, targets=targets, r=rank, alpha=alpha)
        reinit_adapter(model, DRAFT, seed=cfg.seed)
    from .loop import pick_device

    device = pick_device(cfg.device)
    model.to(device)  # (parameters keep their identity: the list below is the model's own)
    params = [p for n, p in model.named_parameters() if f".adapters.{DRAFT}." in n]
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    log(f"model {mdir}: {sum(p.numel() for p in model.parameters()) - n_params:,} frozen params; "
        f"LoRA {DRAFT!r} on {list(targets)} r={rank} alpha={alpha:g}: {n_params:,} trainable")

    model.eval()
    if cfg.data_cache and Path(cfg.data_cache).exists():
        seqs = Sequences(**load_state(Path(cfg.data_cache), "the self-distillation cache"))
        log(f"{len(seqs.tokens)} self-distillation sequences from {cfg.data_cache}")
        prompts = seqs.tokens  # only counted below
    else:
        prompts = train_prompts(mdir, tok, cfg.prompts, n=cfg.n_prompts, prompt_len=cfg.prompt_len, seed=cfg.seed)
        log(f"{len(prompts)} training prompts; generating AR greedy continuations of {cfg.new_tokens} tokens "
            f"({cfg.gen_dtype or cfg.dtype})")
        gen_model = (model if cfg.gen_dtype in (None, cfg.dtype)
                     else load_model(mdir, dtype=getattr(torch, cfg.gen_dtype), device=device))
        seqs = ar_continuations(gen_model, prompts, new=cfg.new_tokens, eos_id=c.eos_token_id, batch=cfg.gen_batch,
                                pad_id=c.pad_token_id if c.pad_token_id is not None else 0, log=log)
        if cfg.data_cache:
            Path(cfg.data_cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save(vars(seqs), cfg.data_cache)
    # Resuming: the settings that shape the run must match the interrupted one.
    settings = {"model": str(mdir.resolve()), "targets": list(targets), "r": rank, "alpha": float(alpha),
                "init_adapter": init_sha,
                "block_lens": list(cfg.block_lens), "steps": cfg.steps, "batch": cfg.batch,
                "blocks_per_seq": cfg.blocks_per_seq, "lr": cfg.lr, "warmup": cfg.warmup,
                "kl_weight": cfg.kl_weight, "ce_weight": cfg.ce_weight, "seed": cfg.seed, "bf16": cfg.bf16,
                "sequences": int(seqs.tokens.shape[0]), "new_tokens": int(seqs.tokens.shape[1])}
    state = None
    if cfg.resume and (out / STATE).exists():
        try:
            state = load_state(out / STATE, "the trainer state")
        except ValueError as e:  # a truncated or foreign file: say so instead of a traceback
            raise ValueError(f"{e}; pass --no-resume to start over") from None
        if state.get("settings") != settings:
            diff = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
            raise ValueError(f"{out / STATE} was written by a run with other settings ({', '.join(diff)}); "
                             f"pass the same flags, another --out, or --no-resume to start over")
        log(f"resuming from step {state['step']} ({out / STATE})")

    def checkpoint(st: dict[str, Any]) -> None:
        from .._io import atomic_dir
        from ..peft import ADAPTER_CONFIG, write_adapter

        with atomic_dir(out, marker=ADAPTER_CONFIG) as tmp:  # adapter + state replace the old pair at once
            write_adapter(model, DRAFT, tmp)
            torch.save({**st, "settings": settings}, tmp / STATE)

    from .loop import StopSignals

    with StopSignals() as stop:
        history = fit_drafter(model, seqs, cfg, params=params, log=log, state=state, checkpoint=checkpoint,
                              stop=stop)
    done = history[-1]["step"] if history else 0
    if stop.name and done < cfg.steps:
        where = f"the adapter and trainer state of step {done} are in {out}" if done else "nothing was written"
        log(f"stopped by {stop.name} at step {done}; {where}; run the same command again to resume")
        return {"out": str(out), "stopped": stop.name, "step": done, "steps": cfg.steps}
    model.eval()
    vocab_note = None
    if cfg.draft_vocab:
        from .. import draftvocab

        targets_seen = seqs.tokens[seqs.valid.bool()]
        corpus = draftvocab.corpus_counts(tok, c.vocab_size, log=log)
        score = draftvocab.mixture(torch.bincount(targets_seen.reshape(-1), minlength=c.vocab_size), *corpus.values())
        ids = draftvocab.from_counts(score, cfg.draft_vocab, keep=[c.eos_token_id], drop=[c.mask_token_id])
        model.set_draft_vocab(ids)
        vocab_note = {"size": int(ids.numel()), "training_coverage":
                      round(draftvocab.coverage(ids, targets_seen, c.vocab_size), 5)}
        log(f"draft vocabulary: {vocab_note['size']} ids cover {vocab_note['training_coverage']:.2%} of the "
            f"{targets_seen.numel():,} self-distilled target tokens")
    save_adapter(model, DRAFT, out)  # the finished adapter replaces the last periodic one (and its state)
    meta = {"model": str(mdir), "init_adapter": cfg.init_adapter, "targets": list(targets), "r": rank, "alpha": alpha,
            "trainable_params": n_params, "steps": cfg.steps, "block_lens": list(cfg.block_lens),
            "prompts": len(prompts), "new_tokens": cfg.new_tokens, "kl_weight": cfg.kl_weight,
            "ce_weight": cfg.ce_weight, "lr": cfg.lr, "batch": cfg.batch, "blocks_per_seq": cfg.blocks_per_seq,
            "seconds": history[-1]["seconds"], "first": history[0], "last": history[-1], "draft_vocab": vocab_note}
    (out / "training.json").write_text(json.dumps({**meta, "history": history}) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"saved adapter to {out} ({size / 1e6:.2f} MB)")
    return {**meta, "out": str(out), "bytes": size}


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trimode train-drafter", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint dir, a training run dir, or 'bundled'")
    p.add_argument("--out", default=None, help="adapter dir (default: where load_model finds it, MODEL/adapters/draft; "
                                               "for --model bundled $TRIMODE_CACHE/trained/bundled/draft, never "
                                               "inside the package)")
    p.add_argument("--targets", default="o_proj", help="comma-separated linear names (default o_proj)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default hidden/16 in [4, 128])")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 4 * rank)")
    p.add_argument("--block-len", default="8", help="draft length K, or a comma list sampled per step")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--blocks-per-seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=0.5)
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--prompts", nargs="*", default=[],
                   help=f"prompt data: {', '.join(TRAIN_SOURCES)} (their train splits), text files/dirs or jsonl")
    p.add_argument("--n-prompts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per text-window prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="AR continuation length per prompt")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--gen-dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the model writing the AR targets (default float32; bfloat16 is ~4x faster on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--data-cache", default=None, help="save / reuse the AR continuations (.pt)")
    p.add_argument("--save-every", type=int, default=50,
                   help="write the adapter and the trainer state every N steps (0: only at the end)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if OUT holds the state of an interrupted run")
    p.add_argument("--init-adapter", default=None,
                   help="continue training from this adapter dir (its targets, rank and alpha; new optimizer)")
    p.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                   help="also write draft_vocab.json: the N tokens ranked first by their frequency in the "
                        "self-distilled targets, the training splits and the Python stdlib (trimode.draftvocab), "
                        "which draft passes then score alone: a cheaper draft head (docs/speculation.md) "
                        "(default: off)")
    p.add_argument("--json", action="store_true", help="print a JSON summary line at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = DrafterConfig(
        model=args.model, out=args.out, targets=tuple(t for t in args.targets.split(",") if t),
        rank=args.rank, alpha=args.alpha, block_lens=_ints(args.block_len), steps=args.steps, batch=args.batch,
        blocks_per_seq=args.blocks_per_seq, lr=args.lr, kl_weight=args.kl_weight, ce_weight=args.ce_weight,
        prompts=tuple(args.prompts), n_prompts=args.n_prompts, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, gen_batch=args.gen_batch, bf16=args.bf16, device=args.device,
        gen_dtype=args.gen_dtype,
        seed=args.seed,
        log_every=args.log_every, data_cache=args.data_cache, save_every=args.save_every,
        resume=not args.no_resume, init_adapter=args.init_adapter, draft_vocab=args.draft_vocab,
    )
    try:
        res = train_drafter(cfg, log=lambda s: print(s, file=sys.stderr if args.json else sys.stdout, flush=True))
    except ValueError as e:
        print(f"trimode train-drafter: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed during the run (a full disk, a directory made read-only)
        print(f"trimode train-drafter: error: {os_error_message(e)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k not in ("first", "last")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
