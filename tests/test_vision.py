"""Vision-language models: our logits == transformers' Mistral3ForConditionalGeneration with one and two
images in the prompt, our preprocessing == its Pixtral image processor, and every decoding mode on an
image prompt: speculative greedy == AR greedy (batched with text rows), AR == transformers' generate.

The checkpoint is a tiny random one written by transformers itself (scripts/make_tiny_vlm.py)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import trimode
from trimode.images import ImageError, ImageLimits, decode_data_url, embed_prompts, load_image, preprocess
from trimode.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_tiny_vlm import IMG, IMG_BREAK, IMG_END, make_tiny_vlm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(h: int, w: int, seed: int = 0, mode: str = "RGB"):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return im.convert(mode) if mode != "RGB" else im


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {"merge2": make_tiny_vlm(root / "merge2"),
            "merge1": make_tiny_vlm(root / "merge1", seed=1, merge=1, feature_layer=-2)}


def _load(path: Path):
    """Our model of `path`, without an EOS id: every row runs its whole budget."""
    m = trimode.load_model(path)
    m.config = m.config.replace(eos_token_id=None)
    return m


def _hf(path: Path):
    m = transformers.Mistral3ForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return m.eval()


def _processor(path: Path):
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    pre = json.loads((path / "preprocessor_config.json").read_text())
    merge = json.loads((path / "config.json").read_text())["spatial_merge_size"]
    p = pre["patch_size"]["height"] * merge  # what PixtralProcessor passes: patch_size * spatial_merge_size
    return PixtralImageProcessorPil(patch_size={"height": p, "width": p}, size=pre["size"])


@pytest.mark.parametrize("size,mode", [((37, 53), "RGB"), ((90, 20), "RGB"), ((200, 130), "RGB"), ((64, 64), "RGB"),
                                       ((1, 1), "RGB"), ((33, 47), "RGBA"), ((50, 41), "L")])
def test_preprocessing_matches_the_pixtral_image_processor(vlm_dirs, size, mode):
    path = vlm_dirs["merge2"]
    model = trimode.load_model(path)
    im = _img(*size, mode=mode)
    ref = _processor(path)(im, return_tensors="pt")
    H, W = ref["image_sizes"][0].tolist()
    ours = preprocess(im, model.vision.config)
    assert tuple(ours.shape) == (3, H, W)
    assert (ours - ref["pixel_values"][0, :, :H, :W]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("which", ["merge2", "merge1"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_equal_transformers_mistral3(vlm_dirs, which, n_images):
    path = vlm_dirs[which]
    hf, ours = _hf(path), trimode.load_model(path)
    assert ours.vision is not None
    imgs = [_img(37, 53, seed=1), _img(90, 20, seed=2)][:n_images]
    prompt = [1, 3, 40, IMG, 41, 42] + ([IMG, 43] if n_images == 2 else []) + [4]
    ids, feats = embed_prompts(ours, [prompt], [imgs])
    proc = _processor(path)(imgs, return_tensors="pt")
    # the expanded prompt is the processor's layout: rows of [IMG] ended by [IMG_BREAK], last one [IMG_END]
    assert ids[0].count(IMG_END) == n_images and ids[0].count(IMG_BREAK) > 0
    assert ids[0].count(IMG) == feats[0].shape[0]
    tokens = torch.tensor(ids)
    with torch.no_grad():
        want = hf(input_ids=tokens, pixel_values=proc["pixel_values"], image_sizes=proc["image_sizes"]).logits
        emb = ours.embed_tokens(tokens).clone()
        emb[0, tokens[0] == IMG] = feats[0]
        got = ours(tokens, inputs_embeds=emb)
        text_only = ours(tokens)
    assert want.abs().max() > 1.0
    assert (got - want).abs().max().item() <= 1e-4
    assert (text_only - want).abs().max().item() > 1e-2, "the image features changed nothing"


def test_ar_with_an_image_equals_transformers_generate(vlm_dirs):
    path = vlm_dirs["merge2"]
    hf, ours = _hf(path), trimode.load_model(path)
    im = _img(40, 28, seed=3)
    prompt = [1, 3, IMG, 50, 51, 4]
    g = trimode.generate(ours, [prompt], images=[[im]], mode="ar", max_new_tokens=12)[0]  # stops at EOS (2)
    ids, _ = embed_prompts(ours, [prompt], [[im]])
    proc = _processor(path)(im, return_tensors="pt")
    out = hf.generate(input_ids=torch.tensor(ids), pixel_values=proc["pixel_values"],
                      image_sizes=proc["image_sizes"], max_new_tokens=12, do_sample=False, eos_token_id=2,
                      pad_token_id=9)
    want = out[0, len(ids[0]):].tolist()
    assert g.tokens == (want[: want.index(2)] if 2 in want else want)


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_speculative_greedy_equals_ar_with_images_batched(vlm_dirs, mode):
    model = _load(vlm_dirs["merge2"])
    tok = Tokenizer.from_dir(vlm_dirs["merge2"])
    chat = tok.encode_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}])
    two = tok.encode_chat([{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}])
    prompts = [chat, tok.encode("plain text row"), two]
    images = [[_img(30, 40, seed=4)], None, [_img(20, 64, seed=5), _img(64, 12, seed=6)]]
    ar = trimode.generate(model, prompts, images=images, mode="ar", max_new_tokens=24)
    alone = [trimode.generate(model, [p], images=[im], mode="ar", max_new_tokens=24)[0]
             for p, im in zip(prompts, images)]
    assert [g.tokens for g in ar] == [g.tokens for g in alone]
    for k in (3, 5):
        spec = trimode.generate(model, prompts, images=images, mode=mode, max_new_tokens=24, block_len=k)
        assert [g.tokens for g in spec] == [g.tokens for g in ar]
    # the image matters: another image, or none, gives another continuation
    other = trimode.generate(model, [chat], images=[[_img(30, 40, seed=99)]], mode="ar", max_new_tokens=24)[0]
    assert other.tokens != ar[0].tokens


def test_diffusion_runs_on_an_image_prompt_batched_like_alone(vlm_dirs):
    model = _load(vlm_dirs["merge2"])
    prompts = [[1, 3, IMG, 60, 4], [1, 3, 61, 62, 4]]
    images = [[_img(24, 24, seed=7)], None]
    both = trimode.generate(model, prompts, images=images, mode="diffusion", max_new_tokens=12, block_len=4)
    alone = [trimode.generate(model, [p], images=[im], mode="diffusion", max_new_tokens=12, block_len=4)[0]
             for p, im in zip(prompts, images)]
    assert [g.tokens for g in both] == [g.tokens for g in alone]
    assert len(both[0].tokens) == 12


def test_expanded_prompts_are_accepted_as_the_processor_writes_them(vlm_dirs):
    model = _load(vlm_dirs["merge2"])
    im = _img(30, 40, seed=8)
    ids, _ = embed_prompts(model, [[1, IMG, 70]], [[im]])
    a = trimode.generate(model, [[1, IMG, 70]], images=[[im]], mode="ar", max_new_tokens=8)[0]
    b = trimode.generate(model, ids, images=[[im]], mode="ar", max_new_tokens=8)[0]
    assert a.tokens == b.tokens


def test_image_sources_bytes_path_data_url_and_pil_agree(vlm_dirs, tmp_path):
    model = _load(vlm_dirs["merge2"])
    im = _img(30, 40, seed=9)
    data = _png(im)
    f = tmp_path / "a.png"
    f.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    outs = [trimode.generate(model, [[1, IMG, 70]], images=[[src]], mode="ar", max_new_tokens=6)[0].tokens
            for src in (im, data, f, str(f), url)]
    assert all(o == outs[0] for o in outs)


# -- bad input -----------------------------------------------------------------------------------
def test_an_image_for_a_text_only_model_is_refused():
    from _tiny import tiny_model

    with pytest.raises(ValueError, match="text-only"):
        trimode.generate(tiny_model(), [[1, 2, 3]], images=[[_img(8, 8)]], mode="ar", max_new_tokens=2)


@pytest.mark.parametrize("src,limits,match", [
    (b"not an image at all", None, "not a supported format"),
    (b"", None, "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, None, "not a supported format|corrupt|could not be read"),
    ("https://example.com/cat.png", None, "never fetches remote URLs"),
    ("data:image/png,rawbytes", None, "base64"),
    ("data:image/png;base64,@@@@", None, "invalid base64"),
    ("data:text/plain;base64,aGVsbG8=", None, "image/\\* media type"),
    ("/no/such/file.png", None, "does not exist"),
    (12, None, "must be bytes, a path"),
    ("BIG", ImageLimits(max_pixels=100), "over the limit of 100"),
    ("BIG", ImageLimits(max_bytes=50), "over the limit of 50"),
])
def test_bad_images_are_named(src, limits, match):
    if src == "BIG":
        src = _png(_img(20, 20))
    with pytest.raises(ImageError, match=match):
        load_image(src, limits=limits or ImageLimits())


def test_unsupported_formats_and_truncated_files_are_refused(tmp_path):
    buf = io.BytesIO()
    _img(16, 16).save(buf, format="TIFF")
    with pytest.raises(ImageError, match="not a supported format"):
        load_image(buf.getvalue())
    png = _png(_img(64, 64))
    with pytest.raises(ImageError, match="corrupt|truncated|could not be read"):
        load_image(png[: len(png) // 2])


def test_request_shape_errors(vlm_dirs):
    model = trimode.load_model(vlm_dirs["merge2"])
    im = _img(16, 16)
    with pytest.raises(ValueError, match="one entry .* per prompt|2 prompts"):
        trimode.generate(model, [[1, IMG], [1, 2]], images=[[im]], mode="ar", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"2 image token\(s\) for 1 image"):
        trimode.generate(model, [[1, IMG, 2, IMG]], images=[[im]], mode="ar", max_new_tokens=2)
    with pytest.raises(ValueError, match="no image was given"):
        trimode.generate(model, [[1, IMG, 2]], mode="ar", max_new_tokens=2)
    with pytest.raises(ValueError, match="over the limit of 1"):
        trimode.generate(model, [[1, IMG, IMG]], images=[[im, im]], mode="ar", max_new_tokens=2,
                         image_limits=ImageLimits(max_images=1))
    with pytest.raises(ImageError, match="never fetches"):
        decode_data_url("http://example.com/x.png")


def test_damaged_vlm_checkpoints_are_named(vlm_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(vlm_dirs["merge2"], bad)
    w = load_file(bad / "model.safetensors")
    w.pop("multi_modal_projector.linear_2.weight")
    save_file(w, bad / "model.safetensors")
    with pytest.raises(ValueError, match="missing vision tensors: multi_modal_projector.linear_2.weight"):
        trimode.load_model(bad)
    w["multi_modal_projector.linear_2.weight"] = torch.zeros(3, 3)
    save_file(w, bad / "model.safetensors")
    with pytest.raises(ValueError, match="linear_2.weight.*shape"):
        trimode.load_model(bad)
    conf = json.loads((vlm_dirs["merge2"] / "config.json").read_text())
    conf["vision_config"]["hidden_act"] = "nonsense"
    (bad / "config.json").write_text(json.dumps(conf))
    shutil.copy(vlm_dirs["merge2"] / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(ValueError, match="activation 'nonsense'"):
        trimode.load_model(bad)


def test_a_vlm_is_not_silently_saved_without_its_vision_tower(vlm_dirs, tmp_path):
    model = trimode.load_model(vlm_dirs["merge2"])
    with pytest.raises(ValueError, match="vision-language"):
        trimode.save_model(model, tmp_path / "out")


def test_cli_generate_with_images_every_speculative_mode_equals_ar(vlm_dirs, tmp_path, capsys):
    from trimode.cli import main

    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    _img(48, 64, seed=10).save(a)
    _img(30, 30, seed=11).save(b, format="JPEG")
    outs = {}
    for mode in ("ar", "linear", "quadratic"):
        argv = ["generate", "--model", str(vlm_dirs["merge2"]), "--image", str(a), "--image", str(b), "--chat",
                "--prompt", "Compare these.", "--mode", mode, "--max-new-tokens", "16", "--json"]
        assert main(argv) == 0
        outs[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]
    assert outs["linear"] == outs["ar"] == outs["quadratic"]
    assert main(["generate", "--model", str(vlm_dirs["merge2"]), "--prompt", "x", "--max-new-tokens", "4",
                 "--json"]) == 0  # a VLM without an image is a text model
    capsys.readouterr()
    assert main(["generate", "--model", "bundled", "--image", str(a), "--prompt", "x"]) == 2
    assert "text-only" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    assert main(["generate", "--model", str(vlm_dirs["merge2"]), "--image", str(bad), "--prompt", "x"]) == 2
    assert "corrupt" in capsys.readouterr().err or "supported format" in capsys.readouterr().err


def test_an_nld_layout_vlm_loads_the_same_model(vlm_dirs, tmp_path):
    """NLD names the text tower encoder.* + diffusion_head.weight (model_type nemotron_labs_diffusion);
    a VLM in that layout keeps vision_tower.* / multi_modal_projector.* beside it, with the text fields at
    the top of config.json. It must load as the same model."""
    from safetensors.torch import load_file, save_file

    src = vlm_dirs["merge2"]
    conf = json.loads((src / "config.json").read_text())
    flat = {**conf["text_config"], **{k: v for k, v in conf.items() if k != "text_config"},
            "model_type": "nemotron_labs_diffusion", "architectures": ["NemotronLabsDiffusionVLM"]}
    w = load_file(src / "model.safetensors")
    renamed = {("encoder." + k[len("language_model.model."):] if k.startswith("language_model.model.")
                else "diffusion_head.weight" if k in ("lm_head.weight", "language_model.lm_head.weight") else k): v
               for k, v in w.items()}
    nld = tmp_path / "nld-vlm"
    nld.mkdir()
    save_file(renamed, nld / "model.safetensors")
    (nld / "config.json").write_text(json.dumps(flat))
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        shutil.copy(src / f, nld / f)
    a, b = _load(src), _load(nld)
    assert b.vision is not None and b.vision.config == a.vision.config
    im = _img(30, 40, seed=12)
    ga = trimode.generate(a, [[1, IMG, 70, 71]], images=[[im]], mode="linear", max_new_tokens=10, block_len=4)[0]
    gb = trimode.generate(b, [[1, IMG, 70, 71]], images=[[im]], mode="linear", max_new_tokens=10, block_len=4)[0]
    assert ga.tokens == gb.tokens
