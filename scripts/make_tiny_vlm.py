"""A tiny random vision-language checkpoint in the Mistral3 layout, written by `transformers` itself.

    python scripts/make_tiny_vlm.py OUT_DIR [--seed 0] [--merge 2] [--feature-layer -1]

No VLM weights can be downloaded on the machines this project runs on, so the tests, the docs'
examples and anyone trying the image path use this: `Mistral3ForConditionalGeneration` (Pixtral
vision encoder, patch merger, Ministral3 text model) with random weights, `save_pretrained` into
OUT_DIR, plus a small byte-level BPE tokenizer that has the Mistral image tokens ([IMG],
[IMG_BREAK], [IMG_END]), a mask token and a chat template that writes one [IMG] per image part.
The text config carries `mask_token_id` (what makes it a tri-mode checkpoint for trimode).
Needs `transformers` (a test dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<mask>", "<pad>"]
IMG, IMG_BREAK, IMG_END, MASK = 5, 6, 7, 8
VOCAB = 320
TEMPLATE = (
    "{{ bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'system' %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'user' %}[INST]"
    "{%- if m.content is string %}{{ m.content }}{%- else %}{%- for p in m.content %}"
    "{%- if p.type == 'text' %}{{ p.text }}{%- elif p.type in ['image', 'image_url'] %}[IMG]{%- endif %}"
    "{%- endfor %}{%- endif %}[/INST]"
    "{%- elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{%- endif %}"
    "{%- endfor %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is in this picture? A red square and a blue circle.",
    "def add(a, b):\n    return a + b\nprint(add(2, 3))",
    "Describe the image. The image shows a small cat sitting on a mat next to a window.",
    "Count the objects: one, two, three, four, five. Colors: red, green, blue, yellow, black, white.",
]


def _tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "mask_token": "<mask>", "chat_template": TEMPLATE,
    }, indent=1))


def make_tiny_vlm(out: str | Path, *, seed: int = 0, merge: int = 2, feature_layer: int = -1,
                  longest_edge: int = 64) -> Path:
    """Write the tiny VLM into `out` (created) and return its path."""
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text = transformers.Ministral3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                         "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
        bos_token_id=1, eos_token_id=2, pad_token_id=9)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=longest_edge, patch_size=4,
                                              hidden_act="silu")
    cfg = transformers.Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                      image_token_index=IMG, spatial_merge_size=merge,
                                      vision_feature_layer=feature_layer, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = transformers.Mistral3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than default init, so that mistakes move logits far above tolerance
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_pre" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(out)
    conf = json.loads((out / "config.json").read_text())
    conf["text_config"]["mask_token_id"] = MASK
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": 4, "spatial_merge_size": merge,
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "PixtralImageProcessor", "patch_size": {"height": 4, "width": 4},
        "size": {"longest_edge": longest_edge}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_resize": True, "do_rescale": True,
        "do_normalize": True, "resample": 3}, indent=1))
    _tokenizer(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", type=int, default=2, help="spatial_merge_size")
    p.add_argument("--feature-layer", type=int, default=-1, help="vision_feature_layer")
    args = p.parse_args(argv)
    path = make_tiny_vlm(args.out, seed=args.seed, merge=args.merge, feature_layer=args.feature_layer)
    print(f"tiny VLM written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
