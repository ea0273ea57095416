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
   checkpoint, `DIR/linear_spec_lora/` for an NLD one (or `--out`).

The verifier never sees the adapter, so greedy output stays identical to AR whatever it learns.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import masks

DRAFT = "draft"
# The bundled model's corpus filter (configs/bundled.toml [data]): prompts come from the same files.
STDLIB_EXCLUDE = ("*/test/*", "*/tests/*", "*/site-packages/*", "*/idlelib/*", "*/lib2to3/*", "*/encodings/*",
                  "*/__pycache__/*", "*/ensurepip/*", "*/config-3*/*", "*/pydoc_data/*")
CATEGORIES = ("gsm8k", "mbpp", "humaneval")
TRAIN_SOURCES = ("gsm8k", "mbpp", "chat")  # names accepted by --prompts (their train splits)


# -- masks and the training forward ---------------------------------------------------------
def draft_training_mask(L: int, anchors: torch.Tensor, K: int) -> torch.Tensor:
    """Boolean (B, L + n K, L + n K) mask over [x (L clean tokens) ; n draft blocks of K tokens].

    anchors: (B, n) position t of each block's first token. Clean tokens are causal among themselves
    (`masks.causal`) and never see blocks; block j sees itself bidirectionally (`masks.bidirectional`)
    and the clean tokens at positions < t_j: the inference draft mask `masks.with_prefix(
    masks.bidirectional(K), cache.length = t_j, ...)`, with the cache replaced by the clean stream.
    """
    B, n = anchors.shape
    dev = anchors.device
    T = L + n * K
    m = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
    m[:, :L, :L] = masks.causal(L, device=dev)
    blk = torch.arange(n * K, device=dev) // K  # block index of each block token
    m[:, L:, L:] = (blk[:, None] == blk[None, :]) & masks.bidirectional(n * K, device=dev)
    t_of = anchors.repeat_interleave(K, dim=1)  # (B, nK): anchor of each block token's block
    m[:, L:, :L] = torch.arange(L, device=dev)[None, None, :] < t_of[:, :, None]
    return m


def draft_training_inputs(
    x: torch.Tensor, anchors: torch.Tensor, K: int, *, mask_id: int, max_seq_len: int,
    adapt_anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, positions, mask and adapter_tokens for one training forward.

    x: (B, L) clean sequences; anchors: (B, n). Block j is [x[t_j], MASK x (K-1)] at positions
    t_j .. t_j+K-1. adapt_anchor: optional (B, n) bool, whether the adapter acts on the anchor token
    (default: yes, as in the linear draft pass). Returns tokens (B, T), positions (B, T), mask
    (B, T, T), adapter_tokens (B, T) with T = L + n K.
    """
    B, L = x.shape
    n = anchors.shape[1]
    dev = x.device
    blocks = torch.full((B, n, K), mask_id, dtype=torch.long, device=dev)
    blocks[:, :, 0] = x.gather(1, anchors)
    tokens = torch.cat([x, blocks.view(B, n * K)], dim=1)
    bpos = (anchors[:, :, None] + torch.arange(K, device=dev)).view(B, n * K)
    positions = torch.cat([torch.arange(L, device=dev).expand(B, L), bpos], dim=1).clamp(max=max_seq_len - 1)
    adapt = torch.ones(B, n, K, dtype=torch.bool, device=dev)
    if adapt_anchor is not None:
        adapt[:, :, 0] = adapt_anchor
    adapter_tokens = torch.cat([torch.zeros(B, L, dtype=torch.bool, device=dev), adapt.view(B, n * K)], dim=1)
    return tokens, positions, draft_training_mask(L, anchors, K), adapter_tokens


def drafter_loss(
    model: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor, anchors: torch.Tensor, K: int, *,
    kl_weight: float = 0.5, ce_weight: float = 1.0, adapt_anchor: torch.Tensor | None = None,
    adapter: str = DRAFT,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Self-distillation loss of the draft adapter on one micro-batch.

    x: (B, L) prompt + AR greedy continuation; valid: (B, L) bool, positions whose token is an AR
    greedy target (the continuation, EOS included); anchors: (B, n) block starts (a block whose
    targets are all invalid contributes nothing). Slot i >= 1 of the block anchored at t predicts
    x[t + i] (llada: from its own logits; dream: from slot i - 1); the teacher is the clean stream's
    causal distribution at t + i - 1. Returns the loss and {ce, kl, acc1, n} for logging.
    """
    c = model.config
    B, L = x.shape
    n = anchors.shape[1]
    dev = x.device
    tokens, positions, mask, adapter_tokens = draft_training_inputs(
        x, anchors, K, mask_id=c.mask_token_id, max_seq_len=c.max_seq_len, adapt_anchor=adapt_anchor)
    i = torch.arange(1, K, device=dev)
    tgt = anchors[:, :, None] + i  # (B, n, K-1) target positions
    in_seq = tgt < L
    tgt_c = tgt.clamp(max=L - 1)
    ok = in_seq & valid.gather(1, tgt_c.view(B, -1)).view(B, n, K - 1)
    shift = 0 if c.dlm_type == "llada" else 1
    slot = L + torch.arange(n, device=dev)[:, None] * K + i[None, :] - shift  # (n, K-1) draft logit slots
    teacher_at = (tgt_c - 1).view(B, -1)  # clean logit predicting x[t+i]
    want = torch.cat([slot.reshape(1, -1).expand(B, -1), teacher_at], dim=1)
    logits = model(tokens, positions, mask=mask, adapter=adapter, adapter_tokens=adapter_tokens,
                   logits_at=want).float()
    m = n * (K - 1)
    draft, teacher = logits[:, :m], logits[:, m:].detach()
    labels = x.gather(1, tgt_c.view(B, -1))
    sel = ok.view(B, -1)
    cnt = sel.sum().clamp_min(1)
    if c.mask_token_id is not None:  # the mask id is never drafted (decoders exclude it)
        draft = draft.clone()
        draft[..., c.mask_token_id] = -1e4
    logp = F.log_softmax(draft, -1)
    ce = -(logp.gather(-1, labels[..., None]).squeeze(-1) * sel).sum() / cnt
    loss = ce_weight * ce
    kl = torch.zeros((), device=dev)
    if kl_weight:
        logq = F.log_softmax(teacher, -1)
        kl = ((logq.exp() * (logq - logp)).sum(-1) * sel).sum() / cnt
        loss = loss + kl_weight * kl
    with torch.no_grad():
        hit = (draft.argmax(-1) == labels) & sel
        acc1 = float(hit.sum() / cnt)
        # Expected accepted drafts per block: the longest all-correct prefix of each block.
        run = (hit | ~sel).view(B, n, K - 1).long().cumprod(-1) * ok.view(B, n, K - 1).long()
        blocks = ok[:, :, 0].sum().clamp_min(1)
        acc_len = float(run.sum() / blocks)
    return loss, {"ce": float(ce.detach()), "kl": float(kl.detach()), "acc1": acc1, "accepted": acc_len, "n": int(cnt)}


# -- prompts ---------------------------------------------------------------------------------
def _heldout_keys(model_dir: Path) -> set[str]:
    f = model_dir / "heldout_files.json"
    return set(json.loads(f.read_text())["files"]) if f.exists() else set()


def stdlib_train_files(model_dir: Path) -> list[Path]:
    """The bundled model's training files: the stdlib .py corpus minus its held-out files."""
    from .data import resolve_files

    held = _heldout_keys(model_dir)
    files = resolve_files(["@stdlib"], suffixes=(".py",), exclude=STDLIB_EXCLUDE, max_file_bytes=200000)
    return [f.path for f in files if f.key not in held]


def text_windows(tok, paths: Sequence[Path], *, n: int, prompt_len: int, seed: int,
                 min_left: int = 64) -> list[list[int]]:
    """n prompts of `prompt_len` tokens cut at random places (seeded) from random files."""
    rng = random.Random(seed)
    paths = list(paths)
    out: list[list[int]] = []
    cache: dict[Path, list[int]] = {}
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        p = rng.choice(paths)
        if p not in cache:
            cache[p] = tok.encode(p.read_text(encoding="utf-8", errors="replace"))
        ids = cache[p]
        if len(ids) < prompt_len + min_left:
            continue
        s = rng.randrange(0, len(ids) - prompt_len - min_left + 1)
        out.append(ids[s:s + prompt_len])
    if not out:
        raise ValueError("no file is long enough for a prompt")
    return out


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def category_texts(category: str, *, split: str, root: Path | None = None) -> list[str]:
    """User messages of a benchmark category. split "train": GSM8K train, MBPP tasks 511-974 (the
    upstream validation and train splits); split "test": GSM8K test, MBPP tasks 11-510, HumanEval
    (test only). `chat` is the project's own general set (`trimode.prompts`: templates for train, a
    separately written set for test). root: the data directory (`trimode.prompts.data_root`)."""
    from ..prompts import CHAT_HELDOUT, chat_train_texts, data_root

    if category == "chat":
        return chat_train_texts() if split == "train" else list(CHAT_HELDOUT)
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {CATEGORIES + ('chat',)}")
    root = data_root(root)
    if category == "gsm8k":
        rows = _jsonl(root / "gsm8k" / f"{'train' if split == 'train' else 'test'}.jsonl")
        return [r["question"] for r in rows]
    if category == "mbpp":
        rows = _jsonl(root / "mbpp" / "mbpp.jsonl")
        lo, hi = (511, 974) if split == "train" else (11, 510)
        return [f"{r['text']}\nYour code should pass this test:\n{r['test_list'][0]}"
                for r in rows if lo <= r["task_id"] <= hi]
    if category == "humaneval":
        if split == "train":
            return []
        rows = _jsonl(root / "humaneval" / "HumanEval.jsonl.gz")
        return [f"Complete this Python function:\n```python\n{r['prompt']}```" for r in rows]
    raise ValueError(f"unknown category {category!r}; choose one of {CATEGORIES}")


def chat_prompts(tok, texts: Sequence[str], *, n: int, seed: int, max_len: int = 256) -> list[list[int]]:
    rng = random.Random(seed)
    texts = list(texts)
    rng.shuffle(texts)
    out = []
    for t in texts:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True))
        if len(ids) <= max_len:
            out.append(ids)
        if len(out) >= n:
            break
    return out


def train_prompts(model_dir: Path, tok, specs: Sequence[str] | None, *, n: int, prompt_len: int,
                  seed: int) -> list[list[int]]:
    """Training prompts: `specs` (names `gsm8k`, `mbpp`, `chat`: the train split of that category as chat
    prompts; jsonl files: chat prompts; text files / dirs: windows), else the stdlib training files
    for a model with heldout_files.json (the bundled one), else chat prompts from the GSM8K and MBPP
    train splits (`trimode.prompts.data_root`). Every source contributes up to n; the mix is shuffled."""
    if specs:
        named = [s for s in specs if s in TRAIN_SOURCES]
        chat = [s for s in specs if s not in named and (s.endswith(".jsonl") or s.endswith(".jsonl.gz"))]
        text = [s for s in specs if s not in chat and s not in named]
        out: list[list[int]] = []
        for s in named:
            out += chat_prompts(tok, category_texts(s, split="train"), n=n, seed=seed)
        for s in chat:
            rows = _jsonl(Path(s))
            key = "question" if "question" in rows[0] else ("text" if "text" in rows[0] else "prompt")
            out += chat_prompts(tok, [r[key] for r in rows], n=n, seed=seed)
        if text:
            from .data import resolve_files

            paths = [f.path for f in resolve_files(text)]
            out += text_windows(tok, paths, n=n, prompt_len=prompt_len, seed=seed)
        random.Random(seed).shuffle(out)
        return out[:n]
    if (model_dir / "heldout_files.json").exists():
        return text_windows(tok, stdlib_train_files(model_dir), n=n, prompt_len=prompt_len, seed=seed)
    half = (n + 1) // 2
    out = chat_prompts(tok, category_texts("gsm8k", split="train"), n=half, seed=seed)
    out += chat_prompts(tok, category_texts("mbpp", split="train"), n=n - len(out), seed=seed)
    return out


# -- self-distillation data ------------------------------------------------------------------
@dataclass
class Sequences:
    """Prompt + AR greedy continuation, right-padded: tokens (N, L), valid (N, L) marks targets."""

    tokens: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor


def ar_continuations(model, prompts: list[list[int]], *, new: int, eos_id: int | None, batch: int = 32,
                     pad_id: int = 0, log=print) -> Sequences:
    """The model's own AR greedy continuations (base weights), EOS kept as the last target."""
    from ..decode import generate

    seqs: list[list[int]] = []
    plens: list[int] = []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        gens = generate(model, chunk, mode="ar", max_new_tokens=new, eos_id=eos_id, draft_adapter=None)
        for p, g in zip(chunk, gens):
            tail = [eos_id] if g.finish_reason == "stop" and eos_id is not None else []
            seqs.append(list(p) + g.tokens + tail)
            plens.append(len(p))
        log(f"  AR continuations {min(s + batch, len(prompts))}/{len(prompts)} "
            f"({time.perf_counter() - t0:.0f}s)")
    L = max(len(q) for q in seqs)
    tokens = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), L, dtype=torch.bool)
    for r, (q, P) in enumerate(zip(seqs, plens)):
        tokens[r, : len(q)] = torch.tensor(q)
        valid[r, P: len(q)] = True
    return Sequences(tokens, valid, torch.tensor([len(q) for q in seqs]), torch.tensor(plens))


def sample_anchors(seqs: Sequences, rows: Sequence[int], n: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """(len(rows), n) block starts in [P - 1, len - 2] (a block needs one target), sampled without
    replacement; rows with fewer candidates repeat some (their duplicate blocks are harmless)."""
    out = torch.empty(len(rows), n, dtype=torch.long)
    for j, r in enumerate(rows):
        lo, hi = int(seqs.prompt_lengths[r]) - 1, int(seqs.lengths[r]) - 2
        span = max(hi - lo + 1, 1)
        perm = torch.randperm(span, generator=gen)
        if span < n:
            perm = perm.repeat(math.ceil(n / span))
        out[j] = lo + perm[:n]
    return out


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
    init_adapter: str | None = None  # start from this adapter's weights (its targets, rank, alpha)
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


def default_out(model_dir: Path) -> Path:
    """Where load_model(model_dir) finds a "draft" adapter."""
    from ..checkpoint import ADAPTERS_DIR, NLD_ADAPTER_DIR

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
                checkpoint=None) -> list[dict[str, Any]]:
    """Train `params` (the draft LoRA) on the self-distillation sequences; returns the step log.

    state: a dict written earlier through `checkpoint` (every cfg.save_every steps): training goes
    on from its step with the same weights, optimizer moments, data order and random stream, so a
    resumed run ends bit-identical to an uninterrupted one."""
    N = seqs.tokens.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    history: list[dict[str, Any]] = []
    order = torch.randperm(N, generator=gen).tolist()
    pos, first = 0, 1
    if state is not None:
        with torch.no_grad():
            for p, v in zip(params, state["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        order, pos, first = list(state["order"]), int(state["pos"]), int(state["step"]) + 1
        history = list(state["history"])
    t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    for step in range(first, cfg.steps + 1):
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
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
            checkpoint({"step": step, "params": [p.detach().clone() for p in params], "opt": opt.state_dict(),
                        "gen": gen.get_state(), "order": order, "pos": pos, "history": history})
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
        ("--rank", cfg.rank if cfg.rank is not None else 1, 1), ("--block-len", min(cfg.block_lens or (0,)), 2))
        if v < lo]
    if not cfg.lr > 0:
        bad.append(f"--lr must be > 0, got {cfg.lr}")
    if bad:
        raise ValueError("; ".join(bad))
    mdir = resolve_model_dir(cfg.model)
    out = Path(cfg.out) if cfg.out else default_out(mdir)
    model = load_model(mdir, dtype=getattr(torch, cfg.dtype))
    tok = load_tokenizer(mdir)
    if tok is None:
        raise ValueError(f"{mdir} has no tokenizer")
    c = model.config
    if c.mask_token_id is None:
        raise ValueError("the model has no mask token: it cannot draft")
    for p in model.parameters():
        p.requires_grad_(False)
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
    params = [p for n, p in model.named_parameters() if f".adapters.{DRAFT}." in n]
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    log(f"model {mdir}: {sum(p.numel() for p in model.parameters()) - n_params:,} frozen params; "
        f"LoRA {DRAFT!r} on {list(targets)} r={rank} alpha={alpha:g}: {n_params:,} trainable")

    model.eval()
    if cfg.data_cache and Path(cfg.data_cache).exists():
        seqs = Sequences(**torch.load(cfg.data_cache, weights_only=True))
        log(f"{len(seqs.tokens)} self-distillation sequences from {cfg.data_cache}")
        prompts = seqs.tokens  # only counted below
    else:
        prompts = train_prompts(mdir, tok, cfg.prompts, n=cfg.n_prompts, prompt_len=cfg.prompt_len, seed=cfg.seed)
        log(f"{len(prompts)} training prompts; generating AR greedy continuations of {cfg.new_tokens} tokens "
            f"({cfg.gen_dtype or cfg.dtype})")
        gen_model = (model if cfg.gen_dtype in (None, cfg.dtype)
                     else load_model(mdir, dtype=getattr(torch, cfg.gen_dtype)))
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
            state = torch.load(out / STATE, weights_only=True)
        except Exception as e:  # a truncated or foreign file: say so instead of a traceback
            raise ValueError(f"cannot read the trainer state {out / STATE} ({e}); "
                             "pass --no-resume to start over") from e
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

    history = fit_drafter(model, seqs, cfg, params=params, log=log, state=state, checkpoint=checkpoint)
    model.eval()
    save_adapter(model, DRAFT, out)  # the finished adapter replaces the last periodic one (and its state)
    meta = {"model": str(mdir), "init_adapter": cfg.init_adapter, "targets": list(targets), "r": rank, "alpha": alpha,
            "trainable_params": n_params, "steps": cfg.steps, "block_lens": list(cfg.block_lens),
            "prompts": len(prompts), "new_tokens": cfg.new_tokens, "kl_weight": cfg.kl_weight,
            "ce_weight": cfg.ce_weight, "lr": cfg.lr, "batch": cfg.batch, "blocks_per_seq": cfg.blocks_per_seq,
            "seconds": history[-1]["seconds"], "first": history[0], "last": history[-1]}
    (out / "training.json").write_text(json.dumps({**meta, "history": history}) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"saved adapter to {out} ({size / 1e6:.2f} MB)")
    return {**meta, "out": str(out), "bytes": size}


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trimode train-drafter", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint dir, a training run dir, or 'bundled'")
    p.add_argument("--out", default=None, help="adapter dir (default: where load_model finds it)")
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
    p.add_argument("--json", action="store_true", help="print a JSON summary line at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = DrafterConfig(
        model=args.model, out=args.out, targets=tuple(t for t in args.targets.split(",") if t),
        rank=args.rank, alpha=args.alpha, block_lens=_ints(args.block_len), steps=args.steps, batch=args.batch,
        blocks_per_seq=args.blocks_per_seq, lr=args.lr, kl_weight=args.kl_weight, ce_weight=args.ce_weight,
        prompts=tuple(args.prompts), n_prompts=args.n_prompts, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, gen_batch=args.gen_batch, bf16=args.bf16, gen_dtype=args.gen_dtype,
        seed=args.seed,
        log_every=args.log_every, data_cache=args.data_cache, save_every=args.save_every,
        resume=not args.no_resume, init_adapter=args.init_adapter,
    )
    try:
        res = train_drafter(cfg, log=lambda s: print(s, file=sys.stderr if args.json else sys.stdout, flush=True))
    except ValueError as e:
        print(f"trimode train-drafter: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k not in ("first", "last")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
