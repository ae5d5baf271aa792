"""Decode, validate and preprocess images. Pillow and numpy only: safe for the query path."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

SUPPORTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"}
FILE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
}
EXTENSION_FOR_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded to 8-bit RGB, with what was learnt about the original."""

    rgb: Image.Image
    format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def looks_like_image(data: bytes) -> bool:
    """Whether the bytes start with the signature of a format we read (so damage means corrupt)."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Validate and fully decode image bytes to RGB (EXIF orientation applied).

    Args:
        data: the encoded image.
        max_bytes: refuse anything larger.
        max_pixels: refuse images whose header declares more pixels (decompression bombs).

    Raises:
        PayloadTooLarge: ``data`` is over ``max_bytes``.
        InvalidImage: empty, truncated, corrupt, or over ``max_pixels``.
        UnsupportedMediaType: not an image format we read.
    """
    if not data:
        raise InvalidImage("the image is empty", code="empty_image")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if looks_like_image(data):
            raise InvalidImage("the image is truncated or corrupt (its header cannot be parsed)") from None
        raise UnsupportedMediaType("not a recognised image (supported: JPEG, PNG, WebP, BMP, TIFF, GIF)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"the image header cannot be read ({type(exc).__name__})") from None
    fmt = img.format or ""
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedMediaType(f"image format {fmt or 'unknown'} is not supported")
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidImage("the image has no pixels")
    if width * height > max_pixels:
        raise InvalidImage(
            f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels",
            code="image_too_large",
        )
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except Image.DecompressionBombError:
        raise InvalidImage("the image exceeds the pixel limit", code="image_too_large") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"the image data is truncated or corrupt ({type(exc).__name__})") from None
    return DecodedImage(rgb=rgb, format=fmt, width=width, height=height)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparent pixels are composited on white, 16-bit greys scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def preprocess(images: list[Image.Image], size: int, mean: float = 127.0, std: float = 128.0) -> np.ndarray:
    """Resize RGB images to ``size`` x ``size`` and normalise for the encoder.

    Args:
        images: RGB images of any size.
        size: the encoder's input side in pixels.
        mean, std: per-pixel normalisation ``(x - mean) / std`` (EfficientNet-Lite: 127, 128).

    Returns:
        float32 array of shape (n, 3, size, size).
    """
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        if img.mode != "RGB":
            img = to_rgb(img)
        resized = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(resized, dtype=np.float32)
        out[i] = arr.transpose(2, 0, 1)
    out -= mean
    out /= std
    return out
