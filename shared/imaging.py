"""Decode, validate and preprocess images. Pillow and numpy only: safe for the query path."""

from __future__ import annotations

import io
import logging
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

log = logging.getLogger(__name__)

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
_PNG_SIGNATURE = _SIGNATURES[0]
# The Pillow plugins tried on upload bytes: only the formats we accept, so no other parser sees them.
# MPO is how Pillow opens a camera JPEG that carries extra pictures (MPF): its first picture is the photo.
_OPEN_FORMATS = tuple(sorted(SUPPORTED_FORMATS))
_FORMAT_ALIASES = {"MPO": "JPEG"}
_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def looks_like_image(data: bytes) -> bool:
    """Whether the bytes start with the signature of a format we read (so damage means corrupt)."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def pillow_pixel_limit() -> int | None:
    """The image size at which Pillow itself refuses to open an image (``DecompressionBombError``), if any."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Validate and fully decode image bytes to RGB (EXIF orientation applied).

    Any failure inside Pillow, however it is raised, is a bad image (400), never a server error.
    The pixel limit is checked on the header's size before any pixel is decoded; Pillow's own bomb
    guard (``Image.MAX_IMAGE_PIXELS``) stays on as a second line and is reported the same way.

    Args:
        data: the encoded image.
        max_bytes: refuse anything larger.
        max_pixels: refuse images whose header declares more pixels (decompression bombs).

    Returns:
        The RGB image, its format, and its width and height as displayed (after EXIF rotation).

    Raises:
        PayloadTooLarge: ``data`` is over ``max_bytes``.
        InvalidImage: empty (``empty_image``), over ``max_pixels`` (``image_too_large``), or truncated
            or corrupt (``invalid_image``).
        UnsupportedMediaType: not an image format we read.
    """
    if not data:
        raise InvalidImage("the image is empty", code="empty_image")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        img: Image.Image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        if looks_like_image(data):
            raise InvalidImage("the image is truncated or corrupt (its header cannot be parsed)") from None
        raise UnsupportedMediaType("not a recognised image (supported: JPEG, PNG, WebP, BMP, TIFF, GIF)") from None
    except Image.DecompressionBombError:
        raise _too_large(max_pixels) from None
    except Exception as exc:  # noqa: BLE001 - parsers of hostile input raise anything (struct.error, IndexError, ...)
        log.info("image header rejected: %s: %s", type(exc).__name__, exc)
        raise InvalidImage(f"the image header cannot be read ({type(exc).__name__})") from None
    fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
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
    if fmt == "PNG":
        check_png_chunks(data)
    try:
        img.load()
        rgb = to_rgb(upright(img))
    except Image.DecompressionBombError:
        raise _too_large(max_pixels) from None
    except Exception as exc:  # noqa: BLE001 - as above: decoders of hostile input raise anything
        log.info("image data rejected: %s: %s", type(exc).__name__, exc)
        raise InvalidImage(f"the image data is truncated or corrupt ({type(exc).__name__})") from None
    return DecodedImage(rgb=rgb, format=fmt, width=rgb.width, height=rgb.height)


def _too_large(max_pixels: int) -> InvalidImage:
    """The error for an image Pillow's bomb guard refused: the lower of its limit and ours is the one passed."""
    pillow = pillow_pixel_limit()
    limit = max_pixels if pillow is None else min(max_pixels, pillow)
    return InvalidImage(f"the image is over the {limit}-pixel limit", code="image_too_large")


def check_png_chunks(data: bytes) -> None:
    """Check a PNG's chunk structure: every chunk complete, critical chunks' CRCs right, an IEND at the end.

    Pillow stops reading once the last row is inflated: it skips IDAT checksums and takes a missing
    IEND for the end of the file, so a PNG cut after its last compressed byte, or with damaged
    image data that still inflates, would decode without complaint. Ancillary chunks with a bad
    CRC are tolerated, as libpng does; anything after IEND is ignored.

    Args:
        data: bytes that start with the PNG signature.

    Raises:
        InvalidImage: a chunk is cut short, a critical chunk is damaged, or the file ends before IEND.
    """
    view = memoryview(data)
    pos, end = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        stop = pos + 8 + length
        if length > 0x7FFFFFFF or stop + 4 > end:
            raise InvalidImage("the PNG is truncated (a chunk is cut short)")
        critical = not kind[0] & 0x20
        if critical and zlib.crc32(view[pos + 4 : stop]) != int.from_bytes(view[stop : stop + 4], "big"):
            raise InvalidImage("the PNG is corrupt (a checksum does not match)")
        if kind == b"IEND":
            return
        pos = stop + 4
    raise InvalidImage("the PNG is truncated (it ends before its IEND chunk)")


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF (or XMP) orientation says; unreadable metadata leaves it as it is.

    Only the pixels are turned (the metadata is dropped later anyway), unlike
    ``ImageOps.exif_transpose``, which also rewrites the EXIF block and can fail on a damaged one.
    """
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001 - broken metadata costs the orientation, not the image
        log.info("ignoring unreadable EXIF: %s: %s", type(exc).__name__, exc)
        return img
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; transparent pixels are composited on white, 16-bit greys scaled down.

    16-bit greys (``I;16*``) are scaled by 255/65535, the full range of the format, so a dark image
    stays dark; 32-bit integers (``I``, range unknown) by their peak when it is over 255. Alpha
    channels, transparent palette entries and transparent colour keys (``tRNS``) all composite on
    white.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = _grey8(img)
    if "transparency" in img.info and img.mode in ("1", "L", "P", "RGB"):
        img = img.convert("RGBA")  # Pillow turns the transparent index or colour key into alpha
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _grey8(img: Image.Image) -> Image.Image:
    """A 16- or 32-bit grey image as 8-bit ``L`` (``LA`` when a colour key makes pixels transparent)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "I":
        peak = float(arr.max()) if arr.size and arr.max() > 255 else 255.0
    else:
        peak = 65535.0
    grey = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
    key = img.info.get("transparency")
    if isinstance(key, int):
        alpha = np.where(np.asarray(img) == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack([grey, alpha]))
    return Image.fromarray(grey)


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
