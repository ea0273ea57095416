"""Images in: decoding (bytes, files, data: URLs, PIL images), limits, and Pixtral preprocessing.

Preprocessing follows the Pixtral image processor (as `transformers`' `PixtralImageProcessorPil`):
convert to RGB; if a side exceeds `longest_edge`, scale both by the same ratio (floored); round each
side up to a multiple of patch_size * spatial_merge_size; resize bicubic (Pillow); scale to [0, 1];
normalise with the checkpoint's mean and std. The result is (3, H, W) float32.

Every problem is an `ImageError` (a ValueError) naming it: unsupported or corrupt data, an image
over the byte or pixel limit, a remote URL (never fetched).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .vision import VisionConfig, image_token_grid

__all__ = ["ImageError", "ImageLimits", "decode_data_url", "embed_prompts", "load_image", "preprocess", "resized_size"]

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")


class ImageError(ValueError):
    """An image that cannot be used, and why."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what a caller may send: images per request, encoded bytes and decoded pixels each."""

    max_images: int = 8
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000  # decoded width * height, before resizing (a decompression-bomb guard)


DEFAULT_LIMITS = ImageLimits()
_URL_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]{1,15}://")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def decode_data_url(url: str, *, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of a `data:image/...;base64,` URL. http(s) and other schemes are refused (never fetched)."""
    if not isinstance(url, str):
        raise ImageError(f"an image URL must be a string, got {type(url).__name__}")
    head = url[:64].lower()
    if not head.startswith("data:"):
        scheme = head.split(":", 1)[0] if ":" in head else "no scheme"
        raise ImageError(f"only data: URLs are accepted for images (base64-encoded); this server never fetches "
                         f"remote URLs (got {scheme!r})")
    m = _DATA_URL.match(url, 0, 512)
    if m is None or not m.group("b64"):
        raise ImageError("an image data: URL must be base64-encoded: data:image/png;base64,...")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ImageError(f"a data: URL for an image must have an image/* media type, got {mime!r}")
    payload = url[m.end():]
    if len(payload) > 4 * math.ceil(limits.max_bytes / 3) + 4:
        raise ImageError(f"image is larger than the limit of {limits.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data: URL holds invalid base64") from None
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    return data


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImageError("images need Pillow: pip install pillow") from None
    return Image


def load_image(src: Any, *, limits: ImageLimits = DEFAULT_LIMITS):
    """A PIL RGB image from bytes, a file path, a data: URL or a PIL image; limits checked before
    the pixel data is decoded."""
    Image = _pil()
    if isinstance(src, Image.Image):
        img = src
        if img.width * img.height > limits.max_pixels:
            raise ImageError(f"image is {img.width} x {img.height} pixels, over the limit of {limits.max_pixels}")
        return img.convert("RGB")
    if isinstance(src, str) and (src[:5].lower() == "data:" or _URL_SCHEME.match(src)):
        data = decode_data_url(src, limits=limits)  # a remote URL is refused there, never fetched
    elif isinstance(src, (str, Path)):
        p = Path(src)
        if not p.is_file():
            raise ImageError(f"image file {p} does not exist")
        size = p.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(f"image file {p} is {size} bytes, over the limit of {limits.max_bytes}")
        data = p.read_bytes()
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if len(data) > limits.max_bytes:
            raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    else:
        raise ImageError(f"an image must be bytes, a path, a data: URL or a PIL image, got {type(src).__name__}")
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageError(f"image data is not a supported format ({', '.join(FORMATS)}) or is corrupt") from None
    except Exception as e:  # Pillow raises several types for malformed headers
        raise ImageError(f"image data could not be read: {e}") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > limits.max_pixels:
        raise ImageError(f"image is {w} x {h} pixels, over the limit of {limits.max_pixels}")
    try:
        with _no_bomb_warning(Image):
            img.load()
        return img.convert("RGB")
    except Exception as e:
        raise ImageError(f"image data is corrupt or truncated ({type(e).__name__}: {e})") from None


class _no_bomb_warning:
    """Pillow's own decompression-bomb check (warning or error) is replaced by `max_pixels`."""

    def __init__(self, Image) -> None:
        self.Image = Image

    def __enter__(self) -> None:
        self.saved = self.Image.MAX_IMAGE_PIXELS
        self.Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc: object) -> None:
        self.Image.MAX_IMAGE_PIXELS = self.saved


def resized_size(config: VisionConfig, height: int, width: int) -> tuple[int, int]:
    """(H, W) after Pixtral's resize rule: fit the longest edge, then round up to the unit."""
    ratio = max(height / config.longest_edge, width / config.longest_edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    u = config.unit
    return ((max(height, 1) - 1) // u + 1) * u, ((max(width, 1) - 1) // u + 1) * u


def preprocess(image: Any, config: VisionConfig, *, limits: ImageLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """(3, H, W) float32 pixels for the vision tower (see the module docstring)."""
    Image = _pil()
    img = load_image(image, limits=limits)
    H, W = resized_size(config, img.height, img.width)
    if (H, W) != (img.height, img.width):
        img = img.resize((W, H), resample=Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(H, W, 3).permute(2, 0, 1)
    x = x.to(torch.float32) * (1 / 255)
    mean = torch.tensor(config.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(config.image_std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def _runs(prompt: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token` in `prompt`."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(prompt):
        if prompt[i] == token:
            j = i
            while j < len(prompt) and prompt[j] == token:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def embed_prompts(model: Any, prompts: Any, images: Any, *, limits: ImageLimits = DEFAULT_LIMITS
                  ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """Prompts with their images: each image's placeholder expanded to its token grid, and per prompt
    the image features (n_image_tokens, hidden) for its [IMG] slots, in order (None without images).

    images: one entry per prompt, each None / [] or a list of images (anything `load_image` takes).
    A prompt marks where image j goes with one image token ([IMG], `image_token_index`), as the
    Mistral3 chat template writes it; the processor's expanded form (the whole grid already there)
    is accepted too when its shape matches the image."""
    tower = getattr(model, "vision", None)
    if not isinstance(images, (list, tuple)):
        raise ValueError("images must be a list with one entry (a list of images, or None) per prompt")
    if len(images) != len(prompts):
        raise ValueError(f"images has {len(images)} entries for {len(prompts)} prompts: give one per prompt "
                         "(None or [] for a prompt without images)")
    lists = [[] if x is None else list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
    if any(lists) and tower is None:
        raise ValueError("this model is text-only (no vision tower): images need a vision-language checkpoint "
                         "(the Mistral3 layout: vision_tower.*, multi_modal_projector.*)")
    out_prompts: list[list[int]] = []
    feats: list[torch.Tensor | None] = []
    for i, (p, imgs) in enumerate(zip(prompts, lists)):
        p = list(p)
        if tower is None:
            out_prompts.append(p)
            feats.append(None)
            continue
        vc = tower.config
        if len(imgs) > limits.max_images:
            raise ValueError(f"prompt {i} has {len(imgs)} images, over the limit of {limits.max_images}")
        runs = _runs(p, vc.image_token_id)
        if not imgs:
            if runs:
                raise ValueError(f"prompt {i} holds image tokens (id {vc.image_token_id}) but no image was given")
            out_prompts.append(p)
            feats.append(None)
            continue
        if vc.image_break_token_id is None or vc.image_end_token_id is None:
            raise ValueError("the checkpoint's tokenizer has no [IMG_BREAK] / [IMG_END] tokens (and config.json "
                             "no image_break_token_id / image_end_token_id): cannot lay out image tokens")
        pixels = [preprocess(im, vc, limits=limits) for im in imgs]
        grids = [image_token_grid(vc, px.shape[1], px.shape[2]) for px in pixels]
        n_tokens = sum(n for _, n in runs)
        if vc.image_end_token_id not in p and n_tokens == len(imgs):  # one placeholder token per image
            slots = [s + k for s, n in runs for k in range(n)]
            new: list[int] = []
            last = 0
            for s, g in zip(slots, grids):
                new += p[last:s] + g
                last = s + 1
            p = new + p[last:]
        else:
            expanded = [t for t in _expanded_runs(p, vc)]
            if [len(g) for g in grids] != expanded:
                raise ValueError(f"prompt {i} holds {n_tokens} image token(s) for {len(imgs)} image(s): write one "
                                 "image token per image (the chat template does) or each image's full token grid")
        if len(p) > model.config.max_seq_len:
            raise ValueError(f"prompt {i} with its images is {len(p)} tokens, over max_seq_len "
                             f"{model.config.max_seq_len}")
        f = torch.cat([tower.encode(px.to(tower.dtype)) for px in pixels], dim=0)
        feats.append(f.to(model.dtype))
        out_prompts.append(p)
    return out_prompts, feats


def _expanded_runs(p: list[int], vc: VisionConfig) -> list[int]:
    """Lengths of the full image grids (from the first [IMG] of an image to its [IMG_END]) in `p`."""
    img, brk, end = vc.image_token_id, vc.image_break_token_id, vc.image_end_token_id
    sizes: list[int] = []
    i = 0
    while i < len(p):
        if p[i] == img:
            j = i
            while j < len(p) and p[j] in (img, brk):
                j += 1
            if j < len(p) and p[j] == end:
                sizes.append(j + 1 - i)
                i = j + 1
                continue
            sizes.append(-1)  # a run that is not a whole grid
            i = j
        else:
            i += 1
    return sizes
