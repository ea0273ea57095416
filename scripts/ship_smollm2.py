"""Copy a trained SmolLM2 draft adapter into the package (trimode/assets/smollm2/adapter/), in bfloat16.

    python scripts/ship_smollm2.py --adapter runs/smol/draft_dream [--decoding MODEL_DIR/decoding.json]
    python scripts/ship_smollm2.py --feature-drafter runs/smol/fd2      # the feature drafter (bf16 already)

The adapter's tensors are cast to bfloat16 (half the bytes; `load_model` casts them to the model's
dtype on load), its adapter_config.json is copied, and with --decoding the measured block lengths
(`trimode bench --write-block-lens`) replace the "decoding" entry of assets/smollm2/model.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ASSET = Path(__file__).resolve().parents[1] / "trimode" / "assets" / "smollm2"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=None, help="adapter directory written by trimode train-drafter")
    p.add_argument("--feature-drafter", default=None,
                   help="feature drafter directory written by trimode train-feature-drafter")
    p.add_argument("--decoding", default=None, help="decoding.json written by trimode bench --write-block-lens")
    args = p.parse_args()
    if args.feature_drafter:
        from trimode.feature_drafter import CONFIG_FILE, DRAFTER_DIR, WEIGHTS_FILE

        fd_out = ASSET / DRAFTER_DIR
        fd_out.mkdir(parents=True, exist_ok=True)
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy(Path(args.feature_drafter) / f, fd_out / f)
        print(f"wrote {fd_out} ({sum(f.stat().st_size for f in fd_out.iterdir()) / 1e6:.1f} MB)")
    if args.decoding:
        spec = json.loads((ASSET / "model.json").read_text())
        dec = json.loads(Path(args.decoding).read_text())
        keys = ("block_len", "tree_nodes", "tree_min_prob", "drafter", "speculative_mode", "by_category")
        spec["decoding"] = {k: dec[k] for k in keys if k in dec}
        (ASSET / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
    if not args.adapter:
        return 0
    src = Path(args.adapter)
    out = ASSET / "adapter"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    save_file(bf16, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "adapter_config.json", out / "adapter_config.json")
    if (src / "draft_vocab.json").is_file():  # a draft vocabulary (train-drafter --draft-vocab) ships with it
        shutil.copy(src / "draft_vocab.json", out / "draft_vocab.json")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB, {len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
