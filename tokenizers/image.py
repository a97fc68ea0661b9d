"""Images: JPEG/PNG payloads decoded, resized, normalised and cut into ViT-style patches."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgetok.tokenizers.base import Modality, Payload, TokenBatch, TokenizeError, WindowKind

# ImageNet channel statistics (torchvision's documented values): the usual normalisation of
# pretrained ViT backbones.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Longest side accepted in the header, whatever the pixel budget: a 1 x 10^7 strip would pass
# a pixel count check yet cost a huge resize.
MAX_SIDE = 16384

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}
_FORMATS = ("JPEG", "PNG")


class ImageConfig(BaseModel):
    """Decode, resize to a square, normalise per channel, and patch like a ViT."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # What the gateway feeds tokenize(): see WindowKind in base.py.
    window_kind: ClassVar[WindowKind] = "payload"

    type: Literal["image"] = Field("image", description="Tokenizer key.")
    image_size: int = Field(224, ge=8, le=2048, description="Side of the square model input.")
    patch_size: int = Field(16, ge=1, le=512, description="Side of each square patch.")
    color: Literal["rgb", "gray"] = Field("rgb", description="Channels fed to the model.")
    resize: Literal["squash", "center_crop"] = Field(
        "squash", description="'squash' ignores aspect ratio; 'center_crop' scales the short "
        "side to image_size and crops the centre.")
    resample: Literal["nearest", "bilinear", "bicubic"] = Field(
        "bilinear", description="Resampling filter: quality against decode time.")
    mean: tuple[float, ...] | None = Field(
        None, description="Per-channel mean on the 0..1 scale; None: ImageNet's (their "
        "average for gray).")
    std: tuple[float, ...] | None = Field(
        None, description="Per-channel std on the 0..1 scale; None: ImageNet's (their "
        "average for gray).")
    max_bytes: int = Field(8 << 20, ge=64, description="Largest payload accepted, in bytes.")
    max_pixels: int = Field(
        24_000_000, ge=64, le=Image.MAX_IMAGE_PIXELS or 89_478_485,
        description="Largest width*height accepted from the header, checked before decoding "
        "(kept under Pillow's own decompression-bomb limit).")

    @model_validator(mode="after")
    def _consistent(self) -> ImageConfig:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        mean, std = self.stats()
        n = 3 if self.color == "rgb" else 1
        if len(mean) != n or len(std) != n or min(std) <= 0:
            raise ValueError(f"mean and std need {n} values, std > 0")
        return self

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The normalisation mean and std in effect, defaults resolved."""
        gray = self.color == "gray"
        mean = self.mean or ((sum(IMAGENET_MEAN) / 3,) if gray else IMAGENET_MEAN)
        std = self.std or ((sum(IMAGENET_STD) / 3,) if gray else IMAGENET_STD)
        return mean, std

    def num_tokens(self) -> int:
        """Patches per image."""
        return (self.image_size // self.patch_size) ** 2

    def token_dim(self) -> int:
        """Width of each token vector."""
        return self.patch_size ** 2 * (3 if self.color == "rgb" else 1)

    def build(self) -> ImageTokenizer:
        """The tokenizer this config describes."""
        return ImageTokenizer(self)


class ImageTokenizer:
    """Batched image decoding (one Pillow decode per image) and vectorised patching."""

    def __init__(self, config: ImageConfig) -> None:
        self.config = config
        self.mode = "RGB" if config.color == "rgb" else "L"
        # Fold /255, mean and std into one multiply-add per value.
        mean, std = config.stats()
        sd = np.asarray(std, np.float32)
        self.gain = (1.0 / (255.0 * sd)).astype(np.float32)
        self.offset = (-np.asarray(mean, np.float32) / sd).astype(np.float32)

    def decode(self, data: bytes, index: int = 0) -> np.ndarray:
        """One payload to a uint8 (size, size, channels) array, or a TokenizeError."""
        cfg = self.config
        if not data:
            raise TokenizeError("empty", "empty image payload", index)
        if len(data) > cfg.max_bytes:
            raise TokenizeError("too_large", f"{len(data)} bytes > max_bytes {cfg.max_bytes}",
                                index)
        try:
            im = Image.open(io.BytesIO(data), formats=_FORMATS)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise TokenizeError("too_large", f"decompression bomb: {e}", index) from e
        except Exception as e:  # Pillow plugins raise many types for garbage headers
            raise TokenizeError("undecodable", f"not a JPEG/PNG image: {e}", index) from e
        w, h = im.size
        if w * h > cfg.max_pixels or max(w, h) > MAX_SIDE:
            raise TokenizeError("too_large", f"{w}x{h} image exceeds max_pixels "
                                f"{cfg.max_pixels} or side {MAX_SIDE}", index)
        if w < 1 or h < 1:
            raise TokenizeError("undecodable", f"{w}x{h} image", index)
        try:
            target = self._target_box(w, h)
            if im.format == "JPEG":
                # Let libjpeg decode at 1/2..1/8 scale when the image is much larger than the
                # target: most of the decode cost disappears, quality stays above the resize.
                im.draft(self.mode, (cfg.image_size, cfg.image_size))
            im.load()
            # Skip the copies convert() and resize() make when there is nothing to do: a
            # camera that already sends model-sized RGB frames pays for the decode only.
            rgb = im if im.mode == self.mode else im.convert(self.mode)
            scale_x, scale_y = rgb.size[0] / w, rgb.size[1] / h
            box = (target[0] * scale_x, target[1] * scale_y, target[2] * scale_x,
                   target[3] * scale_y)
            side = cfg.image_size
            out = (rgb if rgb.size == (side, side) and box == (0.0, 0.0, side, side)
                   else rgb.resize((side, side), _RESAMPLE[cfg.resample], box=box))
            arr = np.asarray(out, dtype=np.uint8)
        except Exception as e:  # truncated or corrupt data surfaces only while decoding
            raise TokenizeError("undecodable", f"image data does not decode: {e}", index) from e
        return arr.reshape(cfg.image_size, cfg.image_size, -1)

    def _target_box(self, w: int, h: int) -> tuple[float, float, float, float]:
        """The source rectangle that the resize maps onto the square output."""
        if self.config.resize == "squash" or w == h:
            return (0.0, 0.0, float(w), float(h))
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        return (left, top, left + side, top + side)

    def tokenize(self, windows: Sequence[Payload | bytes]) -> TokenBatch:
        """Tokenize a batch of image payloads into (B, N, patch*patch*channels) vectors."""
        cfg = self.config
        if not windows:
            raise TokenizeError("empty", "no images to tokenize")
        b, s, p = len(windows), cfg.image_size, cfg.patch_size
        ch = 3 if cfg.color == "rgb" else 1
        pix = np.empty((b, s, s, ch), np.uint8)
        stamps = np.empty(b, np.float64)
        for i, w in enumerate(windows):
            data = w.data if isinstance(w, Payload) else bytes(w)
            pix[i] = self.decode(data, i)
            stamps[i] = w.timestamp if isinstance(w, Payload) else 0.0
        g = s // p
        # (B, gy, p, gx, p, C) -> (B, gy, gx, p, p, C): row-major patches, pixels inside.
        patches = pix.reshape(b, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5)
        flat = patches.reshape(b, g * g, p * p, ch).astype(np.float32)
        flat *= self.gain
        flat += self.offset
        vectors = flat.reshape(b, g * g, p * p * ch)
        mask = np.ones((b, g * g), bool)
        modality = np.full(mask.shape, Modality.IMAGE, np.int16)
        return TokenBatch(modality, np.repeat(stamps[:, None], g * g, axis=1), mask,
                          vectors=vectors)
