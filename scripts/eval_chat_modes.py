"""Decode GSM8K test questions (chat) with ar / quadratic / diffusion on a trimode checkpoint.

usage: python scripts/eval_chat_modes.py CHECKPOINT_DIR [N_PROMPTS] [NEW_TOKENS]
GSM8K comes from $TRIMODE_DATA, else shared/data beside the checkout (`trimode.prompts.data_root`), else
the first 200 test questions packaged with trimode (`trimode.bench.suites`).
Prints tokens per forward, whether quadratic equals AR, and diffusion's token agreement with AR.
"""

import sys
from pathlib import Path

import torch

from trimode.bench.suites import data_dir, math_texts
from trimode.checkpoint import load_model
from trimode.decode import generate
from trimode.tokenizer import load_tokenizer

ckpt = Path(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
new = int(sys.argv[3]) if len(sys.argv) > 3 else 48
try:
    questions = [q for _, q in math_texts(data_dir(), n, chat=True)]
except ValueError as e:
    sys.exit(f"eval_chat_modes: error: {e}")
model = load_model(ckpt, dtype=torch.float32)
tok = load_tokenizer(ckpt)
prompts = [tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n") for q in questions]
torch.set_grad_enabled(False)
ar = generate(model, prompts, mode="ar", max_new_tokens=new)
ref = [g.tokens for g in ar]
print(f"{ckpt}: {n} GSM8K test prompts, {new} new tokens")
print(f"ar         tpf_decode {sum(g.stats['tpf_decode'] for g in ar) / n:.3f}")
for k in (4, 8):
    q = generate(model, prompts, mode="quadratic", max_new_tokens=new, block_len=k)
    same = sum(g.tokens == r for g, r in zip(q, ref))
    print(f"quadratic k={k}  identical {same}/{n}  tpf_decode {sum(g.stats['tpf_decode'] for g in q) / n:.3f}")
d = generate(model, prompts, mode="diffusion", max_new_tokens=new, block_len=8, threshold=0.9)
agree = sum(sum(a == b for a, b in zip(g.tokens, r)) / max(1, min(len(g.tokens), len(r))) for g, r in zip(d, ref))
tpf = sum(g.stats["tpf_decode"] for g in d) / n
print(f"diffusion b=8 t=0.9  tpf_decode {tpf:.3f}  agreement with ar {agree / n:.3f}")
print("ar sample:", repr(tok.decode(ref[0])[:200]))
