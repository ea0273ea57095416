"""The trainer: joint AR + diffusion objective, AdamW, schedules, accumulation, DDP / FSDP2, resumable.

Which samples a step sees, and the noise and block length of each, depend only on (seed, global
sample index), so a run gives the same losses with 1 or N ranks and after a resume. Ranks split each
global batch into contiguous micro-batches; the loss sums and token counts are all-reduced before
dividing (global loss averaging), so the gradient is that of the whole global batch.

Under torchrun (WORLD_SIZE > 1; gloo on CPUs, NCCL with one GPU per rank on GPUs: `device`, "auto"
by default, picks the backend, the FSDP2 mesh and the autocast device) `cfg.dist` picks
DistributedDataParallel ("ddp") or FSDP2 ("fsdp2": `fully_shard` on every block and the root,
parameters / gradients / AdamW state sharded over ranks). Checkpoints are full state dicts either
way, so a run can resume under the other mode or another world size. Only rank 0 writes, logs and
returns the summary (other ranks get {}).

Stopping: SIGTERM or SIGINT (Ctrl-C) asks the run to stop. The step in progress finishes (under
torchrun the ranks agree on the step), a checkpoint is written by the same atomic writer as the
periodic ones, "stopped by SIGTERM at step N; resume with --resume" is logged and `train` returns
normally (`trimode train` exits 0), so `--resume` continues exactly as an uninterrupted run. A
second signal acts as usual (Ctrl-C: KeyboardInterrupt, checkpoint, exit 130; SIGTERM: the process ends).

The output directory is checked for writability before any work, and a run that fails while it is
being set up (bad data, a bad --init, ...) removes the output directory if it created it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .._io import check_writable_dir, load_state
from ..checkpoint import load_model
from ..config import ModelConfig
from ..model import Transformer, init_weights
from . import checkpointing as C
from .config import PRESETS, TrainConfig
from .losses import ar_loss, combine, diffusion_loss, dual_stream_inputs, split_dual
from .noise import derive_seed, noise_batch
from .prepare import Dataset, build_dataset


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine / WSD / constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))
    decay_start = int(cfg.steps * (1 - cfg.wsd_decay_frac))  # warmup-stable-decay
    if step < decay_start:
        return cfg.lr
    frac = (step - decay_start) / max(1, cfg.steps - decay_start)
    return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, frac)


def sample_rows(step: int, micro: int, rank: int, *, cfg: TrainConfig, world: int) -> list[int]:
    """Global sample indices of one micro-batch of one rank."""
    g0 = step * cfg.batch_size + micro * world * cfg.micro_batch_size + rank * cfg.micro_batch_size
    return list(range(g0, g0 + cfg.micro_batch_size))


class Order:
    """Epoch-wise permutation of the dataset, keyed by (seed, epoch): index of global sample g."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._perm = n, seed, {}

    def __call__(self, g: int) -> int:
        epoch = g // self.n
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "order"))
            self._perm = {epoch: torch.randperm(self.n, generator=gen)}
        return int(self._perm[epoch][g % self.n])


def build_model(cfg: TrainConfig, ds: Dataset) -> Transformer:
    if cfg.init:
        model = load_model(cfg.init, dtype=torch.float32)
        if ds.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {ds.vocab_size} tokens but the --init model's vocabulary is {model.config.vocab_size}"
            )
        if model.config.mask_token_id is None:
            raise ValueError(f"the --init checkpoint {cfg.init!r} has no mask_token_id; set it in its config.json")
        if cfg.seq_len > model.config.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
        return model.float()
    if ds.mask_id is None:
        raise ValueError("the tokenizer has no <|mask|> token; training from scratch needs one")
    p = dict(PRESETS[cfg.preset])
    p["max_seq_len"] = max(p["max_seq_len"], cfg.seq_len)
    mc = ModelConfig(
        vocab_size=ds.vocab_size, **p, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        mask_token_id=ds.mask_id, eos_token_id=ds.eos_id, pad_token_id=ds.pad_id, dlm_type=cfg.dlm_type,
        block_len=max(cfg.block_lens),
    )
    return init_weights(Transformer(mc), seed=cfg.seed)


def _param_groups(model: torch.nn.Module) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """(decay, no_decay) lists of (name, parameter): matrices get weight decay, vectors do not."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]


def optimizer_param_names(model: torch.nn.Module) -> list[str]:
    """Parameter names in the optimizer's order: entry i is parameter id i of `opt.state_dict()`."""
    decay, no_decay = _param_groups(model)
    return [n for n, _ in decay + no_decay]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = _param_groups(model)
    return torch.optim.AdamW(
        [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
         {"params": [p for _, p in no_decay], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
    )


def fsdp2_shard(model: Transformer, world: int, device_type: str = "cpu") -> Transformer:
    """Shard `model` in place with FSDP2 over a 1-D CPU mesh of `world` ranks: each block is its own
    unit (all-gathered for its forward / backward, resharded after), the root holds the embedding,
    the final norm and the head."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - torch < 2.6
        raise ValueError(f"dist = 'fsdp2' needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") from None
    mesh = init_device_mesh(device_type, (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _indexed_to_named(sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """`opt.state_dict()` layout (integer parameter ids) -> the FQN layout of torch.distributed.checkpoint."""
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def _named_to_indexed(sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    idx = {n: i for i, n in enumerate(names)}
    return {"state": {idx[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [idx[n] for n in g["params"]]} for g in sd["param_groups"]]}


def full_states(
    model: torch.nn.Module, opt: torch.optim.Optimizer, *, fsdp: bool, names: list[str]
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(full model state dict or None = read the model directly, full optimizer state dict).

    Under FSDP2 both are gathered from the shards (a collective: every rank must call it); only
    rank 0 gets them (the others get empty dicts). The optimizer state always comes back in
    `opt.state_dict()` layout, so checkpoints do not depend on the parallelism mode.
    """
    if not fsdp:
        return None, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=o)
    if not opt.state:  # before the first step (e.g. Ctrl-C at once): nothing sharded to gather, and
        return msd, opt.state_dict()  # get_optimizer_state_dict would initialise the state with a step
    osd = get_optimizer_state_dict(model, opt, options=o)
    return msd, (_named_to_indexed(osd, names) if osd else {})


def load_optimizer_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any], *, fsdp: bool, names: list[str]
) -> None:
    """Load a full optimizer state dict (`opt.state_dict()` layout) into `opt`, sharding it under FSDP2."""
    if len(sd["param_groups"]) != len(opt.param_groups) or sum(len(g["params"]) for g in sd["param_groups"]) != len(
        names
    ):
        raise ValueError("the checkpoint's optimizer state does not match this model's parameters")
    if not fsdp or not sd["state"]:
        opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, _indexed_to_named(sd, names), options=StateDictOptions(full_state_dict=True))


def train_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    """The device this rank trains on: cfg.device ("auto": CUDA when available), one GPU per rank
    (LOCAL_RANK) under torchrun."""
    return pick_device(cfg.device, local_rank)


def pick_device(want: str, local_rank: int = 0) -> torch.device:
    """"auto" (CUDA when available), "cpu", "cuda" (the rank's GPU) or "cuda:N" as a torch device."""
    if want not in ("auto", "cpu", "cuda") and not want.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {want!r}")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device = 'cuda' but this torch sees no CUDA device")
        index = int(want.split(":")[1]) if ":" in want else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"rank {local_rank} wants cuda:{index}, but only {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """The process-group backend of a device: NCCL between GPUs, gloo on CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.device if not hasattr(p, "to_local") else p.to_local().device  # FSDP2: a DTensor's local shard


def _all_reduce(t: torch.Tensor, device: torch.device, op=None) -> torch.Tensor:
    """all_reduce of a small CPU tensor through the backend's device (NCCL reduces GPU tensors only)."""
    x = t.to(device)
    dist.all_reduce(x) if op is None else dist.all_reduce(x, op=op)
    t.copy_(x.cpu())
    return t


def _autocast(cfg: TrainConfig, device: torch.device | None = None):
    kind = "cpu" if device is None else device.type
    return torch.autocast(kind, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()


def micro_losses(
    model: torch.nn.Module, x0: torch.Tensor, lmask: torch.Tensor, rows: list[int], *,
    cfg: TrainConfig, mask_id: int, joint: bool, noise_seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ar_sum, ar_count, diff_sum, diff_count) of one micro-batch."""
    L = x0.shape[1]
    dev = _device_of(model)
    if not joint:
        x0, lmask = x0.to(dev), lmask.to(dev)
        with _autocast(cfg, dev):
            logits = model(x0, torch.arange(L, device=dev)[None, :].expand_as(x0))
        a_sum, a_n = ar_loss(logits, x0, lmask)
        return a_sum, a_n, a_sum.detach() * 0, torch.zeros((), dtype=torch.long)
    # Noise is drawn on the CPU (seeded per sample: the same on every device), then moved.
    xt, masked, p, bls = noise_batch(
        x0, lmask, rows, seed=noise_seed, mask_id=mask_id, block_lens=cfg.block_lens, schedule=cfg.noise,
        eps=cfg.eps, half_life_ratio=cfg.half_life_ratio,
    )
    tokens, positions, mask = dual_stream_inputs(xt, x0, bls)
    if dev.type != "cpu":
        x0, lmask, masked, p = x0.to(dev), lmask.to(dev), masked.to(dev), p.to(dev)
        tokens, positions, mask = tokens.to(dev), positions.to(dev), mask.to(dev)
    with _autocast(cfg, dev):
        logits = model(tokens, positions, mask=mask)
    noisy, clean = split_dual(logits)
    a_sum, a_n = ar_loss(clean, x0, lmask)
    d_sum, d_n = diffusion_loss(noisy, x0, masked, p, dlm_type=cfg.dlm_type)
    return a_sum, a_n, d_sum, d_n


@torch.no_grad()
def evaluate(model: Transformer, ds: Dataset, cfg: TrainConfig) -> dict[str, float]:
    """Validation AR loss (per token) and diffusion loss (sum CE/p over masked / count), fixed noise."""
    n = ds.val_tokens.shape[0]
    if n == 0:
        return {}
    tot = torch.zeros(4, dtype=torch.float64)
    mb = cfg.micro_batch_size
    for b in range(min(cfg.eval_batches, math.ceil(n / mb))):
        rows = list(range(b * mb, min(n, (b + 1) * mb)))
        a_s, a_n, d_s, d_n = micro_losses(
            model, ds.val_tokens[rows], ds.val_mask[rows], rows, cfg=cfg, mask_id=ds.mask_id, joint=True,
            noise_seed=derive_seed(cfg.seed, 0, "val"),
        )
        tot += torch.tensor([float(a_s), float(a_n), float(d_s), float(d_n)], dtype=torch.float64)
    return {"val_ar_loss": float(tot[0] / max(1, tot[1])), "val_diff_loss": float(tot[2] / max(1, tot[3]))}


@dataclass
class Run:
    """One training run's live state: what `setup` builds and `train_step` / `save` / `evaluate_logged` use."""

    cfg: TrainConfig
    log: Callable[[str], None]
    world: int
    rank: int
    fsdp: bool
    accum: int  # micro-batches per rank per step
    out: Path
    ds: Dataset
    model: Transformer  # the unwrapped model (gradient clipping, full states, evaluation without DDP)
    net: torch.nn.Module  # what the forward runs through: the model, its DDP wrapper or its FSDP2 shards
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    names: list[str]  # optimizer parameter names, for full optimizer states
    order: Order
    start: int  # the step the run starts (or resumes) at

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    def write_log(self, rec: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def warmup_warning(cfg: TrainConfig) -> str | None:
    """The warning for a warm-up that fills the whole run (the peak lr and the decay are never reached)."""
    if cfg.warmup_steps < cfg.steps:
        return None
    return (f"warning: warmup_steps {cfg.warmup_steps} >= steps {cfg.steps}: the learning rate stays in its linear "
            f"warm-up for the whole run (it ends at {lr_at(cfg.steps - 1, cfg):.3g}, never the peak lr {cfg.lr:g}, "
            f"and the {cfg.schedule} schedule never runs); lower --warmup_steps or raise --steps")


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (what `mkdir(parents=True)` creates)."""
    missing = None
    p = path
    while not p.exists() and p.parent != p:
        missing, p = p, p.parent
    return missing


def setup(cfg: TrainConfig, *, log=print) -> Run:
    """Process group, dataset, model (fresh, --init, or the latest checkpoint on --resume), wrapping,
    optimizer and schedule. The output directory is checked for writability first; if this call
    creates it and then fails (bad data, bad --init, ...), it removes it again."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    device = train_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    rank = dist.get_rank() if distributed else 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    per_step = world * cfg.micro_batch_size
    if cfg.batch_size % per_step:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be a multiple of world_size x micro_batch_size = {per_step}"
        )
    out = Path(cfg.out_dir)
    created = None
    if rank == 0:
        check_writable_dir(out, "output directory")  # before the dataset, the tokenizer or the model
        if (w := warmup_warning(cfg)) is not None:
            print(w, file=sys.stderr, flush=True)
        created = _first_missing(out)
    try:
        return _setup(cfg, log=log, world=world, rank=rank, out=out)
    except BaseException:
        if created is not None:  # nothing of the user's is in there: this call made it
            shutil.rmtree(created, ignore_errors=True)
        raise


def _check_run_tokenizer(tok_dir: Path, model: Transformer) -> None:
    """The tokenizer every checkpoint gets a copy of must load and fit the model: refuse now, not at the
    first save (or worse, copy a damaged file on)."""
    from ..tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(tok_dir)
        if tok is None:
            raise ValueError(f"no tokenizer.json in {tok_dir}")
        tok.check_model(model.config)
    except ValueError as e:
        raise ValueError(f"the run's tokenizer {tok_dir} is unusable, refusing to copy it into checkpoints: {e} "
                         "(restore it, e.g. from a checkpoint of this run: its tokenizer files are a copy, or "
                         "start a new run)") from None


def _setup(cfg: TrainConfig, *, log, world: int, rank: int, out: Path) -> Run:
    distributed = world > 1
    fsdp = distributed and cfg.dist == "fsdp2"
    per_step = world * cfg.micro_batch_size
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and C.checkpoint_root(out).joinpath(C.LATEST).exists():
            raise ValueError(f"{str(out)!r} already holds checkpoints; pass --resume or choose another out_dir")
        ds = build_dataset(cfg, log=log)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if distributed:
        dist.barrier()
    if rank != 0:
        ds = build_dataset(cfg, log=log)
    model = build_model(cfg, ds)
    _check_run_tokenizer(ds.tokenizer_dir, model)
    start, st = _resume(cfg, model, out, rank, log) if cfg.resume else (0, None)
    if st is None and rank == 0 and (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()
    names = optimizer_param_names(model)
    n_params = sum(p.numel() for p in model.parameters())  # before FSDP2 shards them
    device = train_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    model.to(device)
    if fsdp:
        net = fsdp2_shard(model, world, device_type=device.type)
    elif distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    else:
        net = model
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr)
    if st is not None:
        load_optimizer_state(model, opt, st["optimizer"], fsdp=fsdp, names=names)
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
    if rank == 0:
        log(f"model {n_params / 1e6:.2f}M params; {ds.train_tokens.shape[0]} "
            f"train rows x {cfg.seq_len}; world {world}{f' ({cfg.dist})' if distributed else ''}, "
            f"accum {cfg.batch_size // per_step}")
    return Run(cfg, log, world, rank, fsdp, cfg.batch_size // per_step, out, ds, model, net, opt, sched, names,
               Order(ds.train_tokens.shape[0], cfg.seed), start)


def _record_step(line: str) -> float:
    """The step of one log.jsonl line; a line a kill truncated (or any unreadable one) is dropped (inf)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return math.inf
    return rec.get("step", 0) if isinstance(rec, dict) and isinstance(rec.get("step", 0), int) else math.inf


def _resume(cfg: TrainConfig, model: Transformer, out: Path, rank: int, log) -> tuple[int, dict | None]:
    """Load the latest checkpoint into `model` (full weights: FSDP2 shards them later); returns the step
    and the trainer state (None without a checkpoint). The log keeps only records up to that step."""
    ck = C.latest_checkpoint(out)
    if ck is None:
        return 0, None
    resumed = load_model(ck, dtype=torch.float32).state_dict()
    ours = model.state_dict()
    diff = [k for k in ours if k not in resumed or resumed[k].shape != ours[k].shape]
    if diff or set(resumed) - set(ours):
        raise ValueError(
            f"the checkpoint {str(ck)!r} holds another architecture than this config builds (first difference: "
            f"{(diff or sorted(set(resumed) - set(ours)))[0]}); resume with the config it was written with"
        )
    model.load_state_dict(resumed)
    st = load_state(ck / "train_state.pt", "the trainer state")
    start = int(st["step"])
    log_path = out / "log.jsonl"
    if rank == 0 and log_path.exists():  # drop records after the checkpoint: the log stays exact
        keep = [ln for ln in log_path.read_text(errors="replace").splitlines() if _record_step(ln) <= start]
        log_path.write_text("".join(k + "\n" for k in keep))
    if rank == 0:
        log(f"resumed from {ck} at step {start} (written with {st.get('world_size', 1)} rank(s), "
            f"dist {st.get('dist', 'ddp')})")
    return start, st


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One optimizer step (accumulated over micro-batches, gradients reduced over ranks); returns
    {ar_loss, diff_loss, lr, grad_norm} of the global batch."""
    cfg, ds, net, model = run.cfg, run.ds, run.net, run.model
    joint = step >= cfg.ar_only_steps
    micro = []
    for k in range(run.accum):
        rows = sample_rows(step, k, run.rank, cfg=cfg, world=run.world)
        idx = [run.order(g) for g in rows]
        micro.append((rows, ds.train_tokens[idx], ds.train_mask[idx]))
    # Token counts of the whole global batch, known before the forward (noise is data-only).
    counts = torch.zeros(2, dtype=torch.float64)
    for rows, x0, lm in micro:
        counts[0] += float(lm[:, 1:].sum())
        if joint:
            _, masked, _, _bls = noise_batch(
                x0, lm, rows, seed=cfg.seed, mask_id=ds.mask_id, block_lens=cfg.block_lens,
                schedule=cfg.noise, eps=cfg.eps, half_life_ratio=cfg.half_life_ratio)
            counts[1] += float(masked[:, 1:].sum() if cfg.dlm_type == "dream" else masked.sum())
    if run.distributed:
        _all_reduce(counts, _device_of(run.model))
    ar_n, diff_n = counts.clamp_min(1.0).float()
    sums = torch.zeros(2, dtype=torch.float64)
    model.train()
    for k, (rows, x0, lm) in enumerate(micro):
        last_micro = k == run.accum - 1
        sync = contextlib.nullcontext()
        if run.fsdp:
            # Accumulate unsharded gradients locally; reduce-scatter and reshard only after the
            # last micro-batch (no all-gather between micro-batches).
            net.set_requires_gradient_sync(last_micro)
            net.set_reshard_after_backward(last_micro)
        elif run.distributed and not last_micro:
            sync = net.no_sync()
        with sync:
            a_s, _, d_s, _ = micro_losses(net, x0, lm, rows, cfg=cfg, mask_id=ds.mask_id, joint=joint,
                                          noise_seed=cfg.seed)
            loss = combine(a_s, ar_n, d_s, diff_n, alpha=cfg.alpha if joint else 0.0) * run.world
            loss.backward()
        sums += torch.tensor([float(a_s.detach()), float(d_s.detach())], dtype=torch.float64)
    if run.distributed:
        _all_reduce(sums, _device_of(run.model))
    # Under FSDP2 the gradients are DTensor shards: clip_grad_norm_ reduces the squared norms
    # over ranks (total norm of the full gradient) and returns a replicated DTensor.
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if hasattr(gnorm, "full_tensor"):
        gnorm = gnorm.full_tensor()
    lr = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    return {"ar_loss": float(sums[0] / ar_n), "diff_loss": float(sums[1] / diff_n) if joint else None, "lr": lr,
            "grad_norm": float(gnorm)}


def save(run: Run, step: int) -> None:
    """Checkpoint `step`. Every rank takes part in gathering the full state (FSDP2); rank 0 writes it
    and tells the others whether that worked, so a failed write (full disk) stops every rank, none hangs."""
    cfg = run.cfg
    msd, osd = full_states(run.net, run.opt, fsdp=run.fsdp, names=run.names)
    err: BaseException | None = None
    if run.rank == 0:
        state = {"optimizer": osd, "scheduler": run.sched.state_dict(), "step": step,
                 "rng": torch.get_rng_state(), "train_config": cfg.to_dict(), "world_size": run.world,
                 "dist": cfg.dist if run.distributed else "none"}
        try:
            C.save_checkpoint(run.out, step, run.model, state, tokenizer_dir=run.ds.tokenizer_dir,
                              keep=cfg.keep_checkpoints, model_state_dict=msd)
        except BaseException as e:  # re-raised below, after the other ranks are told
            err = e
    if run.distributed:
        dev = _device_of(run.model)
        failed = torch.tensor([0 if err is None else 1], device=dev)
        dist.broadcast(failed, 0)
        if failed.item() and run.rank != 0:
            raise C.CheckpointError(f"rank 0 could not write the checkpoint of step {step} (see its error)")
    if err is not None:
        raise err


def evaluate_logged(run: Run, step: int, say=None) -> dict[str, float]:
    """Held-out losses at `step`, logged by rank 0. FSDP2 forwards are collectives, so under FSDP2 every
    rank evaluates (the same rows); DDP's forward would sync buffers with idle ranks, so it uses the model."""
    ev: dict[str, float] = {}
    if run.rank == 0 or run.fsdp:
        run.model.eval()
        ev = evaluate(run.net if run.fsdp else run.model, run.ds, run.cfg)
        if ev and run.rank == 0:
            run.write_log({"step": step, **ev})
            (say or run.log)(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    if run.distributed:
        dist.barrier()
    return ev if run.rank == 0 else {}


class StopSignals:
    """SIGTERM and SIGINT as a request to stop at the next step boundary (a context manager).

    Inside it, the first of these signals only records its name in `.name` (and, with `announce`,
    says so on stderr); the training loop finishes its step, writes a checkpoint and returns. The
    previous handlers are put back at once, so a second signal acts as it would without this (Ctrl-C:
    KeyboardInterrupt; SIGTERM: the process ends), and on exit. Outside the main thread (where signal
    handlers cannot be set) it does nothing."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, *, announce: bool = True) -> None:
        self.name: str | None = None
        self.announce = announce
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for n in self.SIGNALS:
                sig = getattr(signal, n, None)
                if sig is not None:
                    with contextlib.suppress(ValueError, OSError):
                        self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.name = signal.Signals(signum).name
        self._restore()
        if self.announce:  # os.write: print() from a handler can re-enter a buffered write
            with contextlib.suppress(OSError):
                os.write(2, f"{self.name}: stopping after the current step (send it again to stop at once)\n"
                         .encode())

    def _restore(self) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def _agreed_stop(run: Run, stop: StopSignals) -> str | None:
    """The signal that stops the run here, agreed by every rank (a signal may reach the ranks at
    different steps: they all stop at the first step boundary after any of them got it)."""
    if not run.distributed:
        return stop.name
    code = torch.tensor([int(signal.Signals[stop.name]) if stop.name else 0])
    _all_reduce(code, _device_of(run.model), op=dist.ReduceOp.MAX)
    return signal.Signals(int(code)).name if int(code) else None


def train(cfg: TrainConfig, *, log=print) -> dict[str, Any]:
    """Run (or resume) a training run; returns the last logged record plus the final evaluation (on
    rank 0; other ranks get {}). SIGTERM / SIGINT stop it at the next step boundary with a
    checkpoint; the record then has "stopped": the signal's name."""
    run = setup(cfg, log=log)
    with StopSignals(announce=run.rank == 0) as stop:
        return _train(run, stop)


def _train(run: Run, stop: StopSignals) -> dict[str, Any]:
    cfg, log = run.cfg, run.log
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    bar = None
    if run.rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=run.start, desc="train", dynamic_ncols=True)
    last: dict[str, Any] = {}
    step = run.start
    if step == 0 and cfg.eval_at_start:
        evaluate_logged(run, 0)
    elif run.distributed:
        dist.barrier()
    t_last, tok_since = time.perf_counter(), 0
    stopped, saved = None, None
    try:
        while step < end:
            stopped = _agreed_stop(run, stop)
            if stopped is not None:
                break
            rec = train_step(run, step)
            step += 1
            tok_since += cfg.batch_size * cfg.seq_len
            l_ar, l_diff = rec["ar_loss"], rec["diff_loss"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ar=f"{l_ar:.3f}", diff="-" if l_diff is None else f"{l_diff:.3f}")
            if step % cfg.log_every == 0 or step == 1 or step == end:
                now = time.perf_counter()
                last = {"step": step, "ar_loss": l_ar, "diff_loss": l_diff,
                        "loss": l_ar + (cfg.alpha * l_diff if l_diff is not None else 0.0), "lr": rec["lr"],
                        "grad_norm": rec["grad_norm"], "tokens_per_s": tok_since / max(1e-9, now - t_last)}
                t_last, tok_since = now, 0
                run.write_log(last)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last.update(evaluate_logged(run, step, say=bar.write if bar is not None else (lambda _: None)))
            if step % cfg.save_every == 0 and step < end:
                save(run, step)
                saved = step
    except KeyboardInterrupt:
        if run.rank == 0:
            log(f"interrupted at step {step}; writing a checkpoint")
        save(run, step)
        raise
    finally:
        if bar is not None:
            bar.close()
    if saved != step:  # the exit checkpoint (a periodic save of this very step already is one)
        save(run, step)
    if stopped is not None:
        if run.rank == 0:
            ck = C.checkpoint_root(run.out) / f"step_{step:08d}"
            log(f"stopped by {stopped} at step {step}; resume with --resume (checkpoint {ck})")
        last = {**last, "stopped": stopped} if last.get("step") == step else {"step": step, "stopped": stopped}
    if run.distributed:  # every rank past its last collective before any tears the group down (gloo aborts
        dist.barrier()   # a process whose peer closes the connections under it)
        dist.destroy_process_group()
    return last if run.rank == 0 else {}
