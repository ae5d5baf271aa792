"""A corpus of hostile and odd image files, built in code, and a runner that sends it through both ingest paths.

:func:`build_corpus` makes 84 small files (about 400 KB in all, deterministic, no network):
decompression bombs in every format we read, truncated and corrupt files, files that are not
images at all, an upload over the byte limit, and odd but valid images (CMYK JPEG, 16-bit PNG,
palette and colour-key transparency, EXIF rotation, animation, 1x1, very wide and very tall).
Each file says what must become of it: ``"ok"`` (stored, embedded, indexed, findable, and decoded
to known pixels) or the HTTP status and error code it is refused with.

:func:`run_corpus` sends the corpus, mixed with real Fashion-MNIST images, through the HTTP upload
(``POST /api/images``) and through the blob trigger, runs the worker once per path, and counts
what went wrong. It needs no pytest fixtures, so benchmarks call it directly::

    from tests.hostile import run_corpus
    report = run_corpus(Path(tmp), fashion=8)
    assert report["hostile_crashes"] == 0 and not report["mismatches"]
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from shared.errors import ClusterlensError
from shared.imaging import decode_image

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from shared.encoder import ImageEncoder
    from shared.queues import JobQueues
    from shared.search import SearchService
    from shared.settings import Settings
    from shared.storage import Storage

log = logging.getLogger(__name__)

# The limits the corpus is built for (small, so the over-the-limit files stay small).
CORPUS_LIMITS: dict[str, int] = {"max_upload_bytes": 256 * 1024, "max_image_pixels": 1_000_000}
OK: Literal["ok"] = "ok"
Expect = Literal["ok"] | tuple[int, str]

_INVALID = (400, "invalid_image")
_TOO_LARGE = (400, "image_too_large")
_UNSUPPORTED = (415, "unsupported_media_type")
_PAYLOAD = (413, "payload_too_large")
_JPEG_MEAN, _JPEG_MAX = 3.0, 80  # lossy: close on average, some ringing at the corner block's edge


@dataclass(frozen=True, eq=False)
class CorpusFile:
    """One file of the corpus and what must become of it.

    Attributes:
        name: unique, also the blob name (``uploads/incoming/<name>``).
        data: the bytes.
        content_type: sent over HTTP (the multipart part's type, and the raw body's ``Content-Type``).
        expect: ``"ok"``, or the (HTTP status, error code) it is refused with.
        blob_code: the quarantine code on the blob path, where it differs from the HTTP code.
        pixels: (h, w, 3) uint8, what a correct decode gives (as displayed, on white).
        mean_error, max_error: how far the decode may be from ``pixels`` (lossy formats).
        size: (width, height) as displayed, where ``pixels`` is not given.
        label: sent with the file (a form field, a query parameter, blob metadata) and kept with it.
    """

    name: str
    data: bytes
    content_type: str
    expect: Expect
    blob_code: str | None = None
    pixels: np.ndarray | None = None
    mean_error: float = 0.0
    max_error: int = 0
    size: tuple[int, int] | None = None
    label: str | None = None

    @property
    def ok(self) -> bool:
        return self.expect == OK

    @property
    def http(self) -> tuple[int, str]:
        """The refusal over HTTP (only for files that are not ``ok``)."""
        assert not isinstance(self.expect, str), self.name
        return self.expect

    @property
    def quarantine_code(self) -> str:
        """The code of its quarantine record on the blob path (only for files that are not ``ok``)."""
        return self.blob_code or self.http[1]

    @property
    def displayed_size(self) -> tuple[int, int] | None:
        if self.pixels is not None:
            return int(self.pixels.shape[1]), int(self.pixels.shape[0])
        return self.size


# -- building blocks -------------------------------------------------------------------------------


def source_rgb(seed: int, width: int = 48, height: int = 32) -> np.ndarray:
    """A smooth, asymmetric RGB picture (JPEG-friendly): tinted gradients and a block in the top-left corner.

    Every seed gives a different picture, so no two corpus images embed alike; the corner block
    makes any rotation or flip show.

    Returns:
        uint8 array of shape (height, width, 3).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = rng.integers(20, 150, 3)
    img = np.empty((height, width, 3), np.float64)
    img[..., 0] = base[0] + 60 * xx / max(width - 1, 1)
    img[..., 1] = base[1] + 60 * yy / max(height - 1, 1)
    img[..., 2] = base[2] + 40 * (xx + yy) / max(width + height - 2, 1)
    img[: max(1, height // 3), : max(1, width // 4)] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """What an RGB picture with an alpha channel looks like on white (as ``shared.imaging.to_rgb`` intends)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _save(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk (length, type, data, CRC), its CRC computed unless given."""
    value = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", value & 0xFFFFFFFF)


def _ihdr(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))


def _png_raw(rows: np.ndarray, depth: int, colour: int, extra: bytes = b"") -> bytes:
    """A PNG written by hand (16-bit kinds Pillow does not write): ``rows`` is (h, w*channels) big-endian samples."""
    height = rows.shape[0]
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    width = rows.shape[1] // samples
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    return _ihdr(width, height, depth, colour) + extra + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk of a well-formed PNG."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        out.append((pos, data[pos + 4 : pos + 8], length))
        pos += 12 + length
    return out


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _bmp_header(width: int, height: int, bpp: int = 24, body: bytes = b"\x00" * 16) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(body), 0, 0, 54) + info + body


def _tiff(width: int, height: int, *, strip_offset: int = 200, ifd_offset: int = 8) -> bytes:
    """A little-endian grey TIFF by hand, one strip, with whatever offsets it is told."""
    entries = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, strip_offset),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, min(width * height, 2**32 - 1)),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
    head = b"II*\x00" + struct.pack("<I", ifd_offset) + ifd + b"\x00\x00\x00\x00"
    return head + b"\x00" * (200 - len(head)) + bytes(range(64))


def _gif_polyglot() -> bytes:
    """A valid GIF that is also JavaScript: ``GIF89a/*<binary>*/=alert(document.domain);``.

    The logical screen's width is the bytes ``/*`` (10799 pixels); everything after the GIF
    trailer is ignored by image decoders and closes the JS comment.
    """
    screen = b"/*" + struct.pack("<H", 10) + b"\x80\x01\x00"  # 10799 x 10, 2-colour table, background white
    palette = b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x4c\x01\x00"  # one pixel, colour 1
    return b"GIF89a" + screen + palette + frame + b";" + b"*/=alert(document.domain);//"


@lru_cache(maxsize=1)
def _deflate_bomb() -> bytes:
    """A real PNG bomb: 2000 x 2000 black pixels (4M, over the corpus limit) in about 4 KB."""
    row = b"\x00" * 2001
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(2000)) + packer.flush()
    return _ihdr(2000, 2000) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _text_bomb() -> bytes:
    """A small valid PNG with a zTXt chunk that inflates to 4 MB (over Pillow's 1 MB text limit)."""
    good = _save(Image.fromarray(source_rgb(90, 8, 8)), "PNG")
    bomb = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (4 * 1024 * 1024), 9))
    return good[:33] + bomb + good[33:]


# -- the corpus ------------------------------------------------------------------------------------


def _odd_valid() -> Iterator[CorpusFile]:
    """Odd but valid images: each must be stored, embedded, indexed and decoded to ``pixels``."""

    src = source_rgb(1)
    rgb = src.astype(np.float64)
    peak = rgb.max(axis=2)
    k = 255.0 - peak
    cmy = np.where(peak[..., None] > 0, 255.0 - rgb * 255.0 / np.maximum(peak, 1)[..., None], 0.0)
    cmyk = np.clip(np.rint(np.dstack([cmy, k])), 0, 255).astype(np.uint8)  # black drawn with K (UCR)
    yield CorpusFile(
        "cmyk_jpeg",
        _save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95),
        "image/jpeg",
        OK,
        pixels=src,
        mean_error=_JPEG_MEAN,
        max_error=_JPEG_MAX,
    )

    yy, xx = np.mgrid[0:32, 0:48]
    grey8 = (40 + 100 * xx / 47 + 40 * yy / 31).astype(np.uint8)  # 40..180: a dark image must stay dark
    low = np.random.default_rng(2).integers(0, 128, grey8.shape)
    grey16 = (grey8.astype(np.uint16) * 257 + low).astype(">u2")
    yield CorpusFile("png16_grey", _png_raw(grey16, 16, 0), "image/png", OK, pixels=_grey3(grey8), max_error=1)
    other8 = (60 + 30 * xx / 47 + 90 * yy / 31).astype(np.uint8)
    other16 = (other8.astype(np.uint16) * 257 + low).astype(">u2")
    key16 = 123 * 257 + 200  # a 16-bit colour key: the corner block made of it is transparent
    other16[:10, :12] = key16
    shown = np.where(other16 == key16, 255, other8).astype(np.uint8)
    yield CorpusFile(
        "png16_grey_colour_key",
        _png_raw(other16, 16, 0, _chunk(b"tRNS", struct.pack(">H", key16))),
        "image/png",
        OK,
        pixels=_grey3(shown),
        max_error=1,
    )

    src = source_rgb(3)
    noise = np.random.default_rng(3).integers(0, 256, src.shape)
    rgb16 = (src.astype(np.uint16) * 256 + noise).astype(">u2")  # Pillow keeps the high byte
    yield CorpusFile("png16_rgb", _png_raw(rgb16.reshape(32, -1), 16, 2), "image/png", OK, pixels=src, max_error=1)
    src = source_rgb(4)
    alpha = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (32, 1))
    rgba16 = (np.dstack([src, alpha]).astype(np.uint16) * 256 + 77).astype(">u2")
    yield CorpusFile(
        "png16_rgba",
        _png_raw(rgba16.reshape(32, -1), 16, 6),
        "image/png",
        OK,
        pixels=composite_on_white(src, alpha),
        max_error=1,
    )

    rng = np.random.default_rng(5)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = ((xx // 6) + (yy // 8) * 8) % 16
    pal = Image.fromarray(index.astype(np.uint8), "P")
    pal.putpalette(palette.tobytes())
    alphas = np.array([0, 128] + [255] * 14, np.uint8)
    yield CorpusFile(
        "palette_png_transparency",
        _save(pal, "PNG", transparency=alphas.tobytes()),
        "image/png",
        OK,
        pixels=composite_on_white(palette[index], alphas[index]),
        max_error=1,
    )

    grey = source_rgb(6)[..., 0]
    ramp = np.tile(np.linspace(255, 0, 48).astype(np.uint8), (32, 1))
    yield CorpusFile(
        "la_png",
        _save(Image.fromarray(np.dstack([grey, ramp]), "LA"), "PNG"),
        "image/png",
        OK,
        pixels=composite_on_white(grey, ramp),
        max_error=1,
    )
    src = source_rgb(7)
    down = np.tile(np.linspace(0, 255, 32).astype(np.uint8)[:, None], (1, 48))
    yield CorpusFile(
        "rgba_png",
        _save(Image.fromarray(np.dstack([src, down]), "RGBA"), "PNG"),
        "image/png",
        OK,
        pixels=composite_on_white(src, down),
        max_error=1,
    )
    src = source_rgb(8)
    key = tuple(int(v) for v in src[0, 0])  # the corner block's colour is transparent
    keyed = np.all(src == np.array(key, np.uint8), axis=2)
    yield CorpusFile(
        "rgb_png_colour_key",
        _save(Image.fromarray(src), "PNG", transparency=key),
        "image/png",
        OK,
        pixels=np.where(keyed[..., None], 255, src).astype(np.uint8),
    )
    grey = source_rgb(9)[..., 1]
    yield CorpusFile(
        "grey_png_colour_key",
        _save(Image.fromarray(grey), "PNG", transparency=int(grey[0, 0])),
        "image/png",
        OK,
        pixels=_grey3(np.where(grey == grey[0, 0], 255, grey).astype(np.uint8)),
    )

    # EXIF orientation: the stored pixels are the upright picture turned the other way.
    upright = source_rgb(10)
    stored6 = np.asarray(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90))  # 6: turn 90 clockwise
    yield CorpusFile(
        "exif6_jpeg",
        _save(Image.fromarray(stored6), "JPEG", quality=95, exif=_exif(6)),
        "image/jpeg",
        OK,
        pixels=upright,
        mean_error=_JPEG_MEAN,
        max_error=_JPEG_MAX,
    )
    upright = source_rgb(11)
    yield CorpusFile(
        "exif3_jpeg",
        _save(Image.fromarray(upright[::-1, ::-1].copy()), "JPEG", quality=95, exif=_exif(3)),
        "image/jpeg",
        OK,
        pixels=upright,
        mean_error=_JPEG_MEAN,
        max_error=_JPEG_MAX,
    )
    upright = source_rgb(12)
    stored8 = np.asarray(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_270))  # 8: turn 90 anticlockwise
    yield CorpusFile(
        "exif8_png", _save(Image.fromarray(stored8), "PNG", exif=_exif(8)), "image/png", OK, pixels=upright
    )
    src = source_rgb(13)
    plain = _save(Image.fromarray(src), "JPEG", quality=95)
    broken_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05" + b"\xff" * 20  # five entries promised, none there
    yield CorpusFile(
        "jpeg_broken_exif",
        plain[:2] + b"\xff\xe1" + struct.pack(">H", len(broken_exif) + 2) + broken_exif + plain[2:],
        "image/jpeg",
        OK,
        pixels=src,
        mean_error=_JPEG_MEAN,
        max_error=_JPEG_MAX,
    )

    # Animation: the first frame is the picture.
    first = Image.fromarray(source_rgb(14)).quantize(32)
    later = [Image.new("P", (48, 32), 0), Image.new("P", (48, 32), 5)]
    for frame in later:
        frame.putpalette(first.getpalette() or [])
    yield CorpusFile(
        "animated_gif",
        _save(first, "GIF", save_all=True, append_images=later, duration=80, loop=0),
        "image/gif",
        OK,
        pixels=np.asarray(first.convert("RGB")),
    )
    frames = [Image.fromarray(source_rgb(s)) for s in (15, 16, 17)]
    yield CorpusFile(
        "animated_webp",
        _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=80),
        "image/webp",
        OK,
        pixels=np.asarray(frames[0]),
    )
    frames = [Image.fromarray(source_rgb(s)) for s in (18, 19)]
    yield CorpusFile(
        "animated_png",
        _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=80),
        "image/png",
        OK,
        pixels=np.asarray(frames[0]),
    )
    frames = [Image.fromarray(source_rgb(s)) for s in (20, 21)]
    yield CorpusFile(
        "multipage_tiff",
        _save(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "image/tiff",
        OK,
        pixels=np.asarray(frames[0]),
    )
    frames = [Image.fromarray(source_rgb(s)) for s in (22, 23)]
    yield CorpusFile(
        "mpo_camera_jpeg",  # a camera JPEG with a second picture (MPF): Pillow calls it MPO
        _save(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95),
        "image/jpeg",
        OK,
        pixels=np.asarray(frames[0]),
        mean_error=_JPEG_MEAN,
        max_error=_JPEG_MAX,
    )

    # Sizes.
    dot = np.array([[[12, 200, 34]]], np.uint8)
    yield CorpusFile("one_by_one_png", _save(Image.fromarray(dot), "PNG"), "image/png", OK, pixels=dot)
    dot = np.array([[[230, 40, 90]]], np.uint8)
    one = Image.new("P", (1, 1), 0)
    one.putpalette(dot.tobytes())
    yield CorpusFile("one_by_one_gif", _save(one, "GIF"), "image/gif", OK, pixels=dot)
    wide = np.zeros((3, 10000, 3), np.uint8)
    wide[..., 0] = (np.arange(10000) * 255 // 9999).astype(np.uint8)
    wide[1, :, 1] = 200
    yield CorpusFile("very_wide_png", _save(Image.fromarray(wide), "PNG"), "image/png", OK, pixels=wide)
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2)[:, :, ::-1])
    yield CorpusFile("very_tall_png", _save(Image.fromarray(tall), "PNG"), "image/png", OK, pixels=tall)

    # Plain formats and flavours.
    grey = source_rgb(24)[..., 2]
    yield CorpusFile(
        "grey_jpeg",
        _save(Image.fromarray(grey), "JPEG", quality=95),
        "image/jpeg",
        OK,
        pixels=_grey3(grey),
        mean_error=_JPEG_MEAN,
        max_error=_JPEG_MAX,
    )
    src = source_rgb(25)
    yield CorpusFile(
        "progressive_jpeg",
        _save(Image.fromarray(src), "JPEG", quality=95, progressive=True),
        "image/jpeg",
        OK,
        pixels=src,
        mean_error=_JPEG_MEAN,
        max_error=_JPEG_MAX,
    )
    src = source_rgb(26)
    yield CorpusFile(
        "tiff_lzw", _save(Image.fromarray(src), "TIFF", compression="tiff_lzw"), "image/tiff", OK, pixels=src
    )
    src = source_rgb(27)
    yield CorpusFile("bmp_24bit", _save(Image.fromarray(src), "BMP"), "image/bmp", OK, pixels=src)
    pal = Image.fromarray(source_rgb(28)).quantize(64)
    yield CorpusFile("bmp_8bit_palette", _save(pal, "BMP"), "image/bmp", OK, pixels=np.asarray(pal.convert("RGB")))
    src = source_rgb(29)
    yield CorpusFile(
        "webp_lossy",
        _save(Image.fromarray(src), "WEBP", quality=90),
        "image/webp",
        OK,
        pixels=src,
        mean_error=4.0,
        max_error=48,
    )
    src = source_rgb(30)
    yield CorpusFile(
        "webp_lossless_alpha",
        _save(Image.fromarray(np.dstack([src, ramp])), "WEBP", lossless=True),
        "image/webp",
        OK,
        pixels=composite_on_white(src, ramp),
        max_error=1,
    )
    pal = Image.fromarray(source_rgb(31)).quantize(16)
    see_through = int(np.asarray(pal)[0, 0])
    yield CorpusFile(
        "gif_transparent_index",
        _save(pal, "GIF", transparency=see_through),
        "image/gif",
        OK,
        pixels=np.where((np.asarray(pal) == see_through)[..., None], 255, np.asarray(pal.convert("RGB"))).astype(
            np.uint8
        ),
    )
    bits = ((xx + yy) % 3 == 0).astype(np.uint8) * 255
    yield CorpusFile(
        "bilevel_png", _save(Image.fromarray(bits).convert("1"), "PNG"), "image/png", OK, pixels=_grey3(bits)
    )
    src = source_rgb(32)
    yield CorpusFile(
        "png_trailing_bytes",
        _save(Image.fromarray(src), "PNG") + b"appended after IEND by some tool",
        "image/png",
        OK,
        pixels=src,
    )
    src = source_rgb(33)
    yield CorpusFile(
        "jpeg_trailing_bytes",
        _save(Image.fromarray(src), "JPEG", quality=95) + b"\x00" * 64 + b"camera maker trailer",
        "image/jpeg",
        OK,
        pixels=src,
        mean_error=_JPEG_MEAN,
        max_error=_JPEG_MAX,
    )
    src = source_rgb(34)
    yield CorpusFile(
        "png_sent_as_jpeg", _save(Image.fromarray(src), "PNG"), "image/jpeg", OK, pixels=src
    )  # the bytes decide, not the declared type
    yield CorpusFile("gif_js_polyglot", _gif_polyglot(), "image/gif", OK, size=(10799, 10))


def _hostile() -> Iterator[CorpusFile]:
    """Files that must be refused, each with its status and code."""
    rng = np.random.default_rng(99)
    noise = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    noisy_png = _save(Image.fromarray(noise), "PNG")
    flat_png = _save(Image.fromarray(np.full((28, 28), 200, np.uint8)), "PNG")  # 79 bytes
    idat = next((pos, length) for pos, kind, length in _png_chunks(noisy_png) if kind == b"IDAT")
    jpeg = _save(Image.fromarray(source_rgb(40)), "JPEG", quality=90)

    # Empty, tiny, and not images at all.
    yield CorpusFile("zero_bytes", b"", "image/png", (400, "empty_upload"), blob_code="empty_image")
    yield CorpusFile("one_byte", b"\xff", "image/jpeg", _UNSUPPORTED)
    yield CorpusFile("text", b"hello, this is not an image\n", "text/plain", _UNSUPPORTED)
    yield CorpusFile(
        "html", b"<!doctype html><html><body><script>alert(1)</script></body></html>", "text/html", _UNSUPPORTED
    )
    svg = (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        b'<script type="text/javascript">alert(document.cookie)</script><rect width="10" height="10"/></svg>'
    )
    yield CorpusFile("svg_with_script", svg, "image/svg+xml", _UNSUPPORTED)
    yield CorpusFile(
        "pdf_header",
        b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<<>>\n%%EOF\n",
        "application/pdf",
        _UNSUPPORTED,
    )
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo("photo.png", date_time=(2020, 1, 1, 0, 0, 0)), noisy_png)
    yield CorpusFile("zip_with_png", archive.getvalue(), "application/zip", _UNSUPPORTED)
    yield CorpusFile("gzip_png", gzip.compress(noisy_png, mtime=0), "application/gzip", _UNSUPPORTED)
    elf = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + struct.pack("<HHI", 2, 62, 1) + b"\x00" * 40
    yield CorpusFile("elf_header", elf, "application/octet-stream", _UNSUPPORTED)
    yield CorpusFile("json", json.dumps({"image": "nope"}).encode(), "application/json", _UNSUPPORTED)
    yield CorpusFile("random_bytes", b"\x00" + rng.bytes(4095), "application/octet-stream", _UNSUPPORTED)
    yield CorpusFile(
        "eps_ghostscript",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(x) print\n",
        "image/x-eps",
        _UNSUPPORTED,
    )
    yield CorpusFile(
        "ico_valid_but_unsupported", _save(Image.new("RGB", (16, 16), (1, 2, 3)), "ICO"), "image/x-icon", _UNSUPPORTED
    )
    yield CorpusFile(
        "ppm_valid_but_unsupported",
        _save(Image.fromarray(source_rgb(41)), "PPM"),
        "image/x-portable-pixmap",
        _UNSUPPORTED,
    )

    # Truncated and corrupt.
    yield CorpusFile("png_truncated_to_60_bytes", flat_png[:60], "image/png", _INVALID)
    yield CorpusFile("png_truncated_mid_idat", noisy_png[: idat[0] + 8 + idat[1] // 2], "image/png", _INVALID)
    yield CorpusFile("png_without_iend", noisy_png[:-12], "image/png", _INVALID)
    crc_at = idat[0] + 8 + idat[1]
    bad_crc = noisy_png[:crc_at] + bytes(b ^ 0xFF for b in noisy_png[crc_at : crc_at + 4]) + noisy_png[crc_at + 4 :]
    yield CorpusFile("png_bad_idat_crc", bad_crc, "image/png", _INVALID)
    yield CorpusFile("png_bad_ihdr_crc", noisy_png[:29] + b"\x00\x00\x00\x00" + noisy_png[33:], "image/png", _INVALID)
    flipped = bytearray(noisy_png)
    flipped[idat[0] + 8 + idat[1] // 2] ^= 0x55  # damaged pixels, the CRC still says so
    yield CorpusFile("png_flipped_byte_in_idat", bytes(flipped), "image/png", _INVALID)
    huge = struct.pack(">I", 0x7FFFFFF0) + b"tEXt" + b"Comment\x00" + b"x" * 32
    yield CorpusFile("png_chunk_huge_length", noisy_png[:33] + huge, "image/png", _INVALID)
    yield CorpusFile("png_header_random_body", noisy_png[:33] + rng.bytes(512), "image/png", _INVALID)
    yield CorpusFile(
        "png_idat_not_deflate",
        _ihdr(28, 28) + _chunk(b"IDAT", rng.bytes(300)) + _chunk(b"IEND", b""),
        "image/png",
        _INVALID,
    )
    yield CorpusFile("png_text_bomb", _text_bomb(), "image/png", _INVALID)
    yield CorpusFile("jpeg_truncated", jpeg[: len(jpeg) // 2], "image/jpeg", _INVALID)
    yield CorpusFile("jpeg_without_eoi", jpeg[:-2], "image/jpeg", _INVALID)
    jfif = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    yield CorpusFile(
        "jpeg_garbage_after_header", jfif + rng.bytes(600).replace(b"\xff", b"\x00"), "image/jpeg", _INVALID
    )
    yield CorpusFile("jpeg_soi_only", b"\xff\xd8\xff", "image/jpeg", _INVALID)
    gif = _save(Image.fromarray(source_rgb(42)).quantize(64), "GIF")
    yield CorpusFile("gif_truncated", gif[: len(gif) // 2], "image/gif", _INVALID)
    yield CorpusFile(
        "gif_without_frames", b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0, 0, 0) + b";", "image/gif", _INVALID
    )
    webp = _save(Image.fromarray(source_rgb(43)), "WEBP", quality=80)
    yield CorpusFile("webp_truncated", webp[: len(webp) // 2], "image/webp", _INVALID)
    bmp = _save(Image.fromarray(source_rgb(44)), "BMP")
    yield CorpusFile("bmp_truncated_pixels", bmp[: len(bmp) // 2], "image/bmp", _INVALID)
    yield CorpusFile("bmp_bad_bit_depth", _bmp_header(4, 4, bpp=7), "image/bmp", _INVALID)
    yield CorpusFile("tiff_strip_past_the_end", _tiff(8, 8, strip_offset=10**9), "image/tiff", _INVALID)
    yield CorpusFile("tiff_ifd_past_the_end", _tiff(8, 8, ifd_offset=10**9), "image/tiff", _INVALID)
    loop = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 256, 4, 1, 8) + b"\x08\0\0\0"
    yield CorpusFile("tiff_ifd_points_at_itself", loop, "image/tiff", _INVALID)

    # Decompression bombs: a huge size declared in a tiny file.
    tiny_idat = _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    yield CorpusFile("png_bomb_deflate_2000x2000", _deflate_bomb(), "image/png", _TOO_LARGE)
    yield CorpusFile(
        "png_bomb_10000x10000", _ihdr(10000, 10000) + tiny_idat + _chunk(b"IEND", b""), "image/png", _TOO_LARGE
    )
    yield CorpusFile(  # over twice Image.MAX_IMAGE_PIXELS: Pillow raises DecompressionBombError in Image.open
        "png_bomb_100000x100000", _ihdr(100000, 100000) + tiny_idat + _chunk(b"IEND", b""), "image/png", _TOO_LARGE
    )
    lzw_one_pixel = b"\x02\x02\x4c\x01\x00"
    yield CorpusFile(
        "gif_bomb_screen_65535x65535",
        b"GIF89a"
        + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
        + b","
        + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
        + lzw_one_pixel
        + b";",
        "image/gif",
        _TOO_LARGE,
    )
    yield CorpusFile(
        "gif_bomb_frame_outside_screen",
        b"GIF89a"
        + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b","
        + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0)
        + lzw_one_pixel
        + b";",
        "image/gif",
        _TOO_LARGE,
    )
    yield CorpusFile("tiff_bomb_100000x100000", _tiff(100000, 100000), "image/tiff", _TOO_LARGE)
    yield CorpusFile("tiff_bomb_3000x3000", _tiff(3000, 3000), "image/tiff", _TOO_LARGE)
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (16383 - 1).to_bytes(3, "little") * 2
    yield CorpusFile(
        "webp_bomb_16383x16383", b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x, "image/webp", _TOO_LARGE
    )
    yield CorpusFile("bmp_bomb_50000x50000", _bmp_header(50000, 50000), "image/bmp", _TOO_LARGE)
    yield CorpusFile("bmp_absurd_negative_height", _bmp_header(4, -(2**31)), "image/bmp", _TOO_LARGE)
    sof = jpeg.find(b"\xff\xc0")
    jpeg_bomb = jpeg[: sof + 5] + struct.pack(">HH", 65500, 65500) + jpeg[sof + 9 :]
    yield CorpusFile("jpeg_bomb_65500x65500", jpeg_bomb, "image/jpeg", _TOO_LARGE)

    # Over the byte limit (CORPUS_LIMITS: 256 KiB): a real PNG of noise.
    big = np.random.default_rng(7).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    yield CorpusFile("oversized_png", _save(Image.fromarray(big), "PNG"), "image/png", _PAYLOAD)


def build_corpus() -> list[CorpusFile]:
    """The whole corpus: odd-but-valid images first, then the hostile files (names unique, bytes distinct).

    Raises:
        AssertionError: if two files share a name or their bytes (the runner tells them apart by both).
    """
    files = list(_odd_valid()) + list(_hostile())
    assert len({f.name for f in files}) == len(files), "corpus names must be unique"
    assert len({f.data for f in files}) == len(files), "corpus files must differ"
    return files


def check_decode(file: CorpusFile, *, max_bytes: int, max_pixels: int) -> str | None:
    """How ``shared.imaging.decode_image`` fails an ``ok`` file's expected pixels, or None if it does not."""
    try:
        decoded = decode_image(file.data, max_bytes=max_bytes, max_pixels=max_pixels)
    except ClusterlensError as exc:
        return f"{file.name}: refused ({exc.code}: {exc.message})"
    got = np.asarray(decoded.rgb)
    if (decoded.width, decoded.height) != file.displayed_size:
        return f"{file.name}: decoded to {decoded.width}x{decoded.height}, expected {file.displayed_size}"
    if file.pixels is None:
        return None
    if got.shape != file.pixels.shape or got.dtype != np.uint8:
        return f"{file.name}: decoded to {got.shape} {got.dtype}, expected {file.pixels.shape} uint8"
    diff = np.abs(got.astype(np.int16) - file.pixels.astype(np.int16))
    if diff.mean() > file.mean_error or diff.max() > max(file.max_error, file.mean_error):
        return f"{file.name}: pixels off by {diff.mean():.2f} on average, {diff.max()} at most"
    return None


# -- the runner ------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """What one path did with the files it was sent (corpus and good images)."""

    attempts: int = 0
    as_expected: int = 0
    server_errors: int = 0  # 5xx answers
    exceptions: int = 0  # raised out of a handler


@dataclass
class _Path:
    """One ingest path's own data folder, job queues, search service and client."""

    settings: Settings
    storage: Storage
    queues: JobQueues
    service: SearchService
    client: TestClient
    tally: _Tally = field(default_factory=_Tally)


def good_images(folder: Path, n: int, offset: int = 7000) -> list[CorpusFile]:
    """``n`` labelled Fashion-MNIST training images (28 x 28 grey PNGs) as ``ok`` files."""
    from job.datasets import fashion_mnist_items

    items = fashion_mnist_items(folder, "train", limit=n, offset=offset)
    return [
        CorpusFile(f"fashion_{i}", item.data, "image/png", OK, size=(28, 28), label=item.label)
        for i, item in enumerate(items)
    ]


def run_corpus(
    data_dir: Path,
    *,
    encoder: ImageEncoder | None = None,
    fashion: int = 8,
    corpus: list[CorpusFile] | None = None,
) -> dict[str, Any]:
    """Send the corpus and ``fashion`` Fashion-MNIST images through both ingest paths; count what went wrong.

    HTTP path: every file is posted twice to ``POST /api/images`` (a multipart ``image`` field, then
    the raw body with its content type) on a TestClient that turns server errors into responses.
    Blob path: the registered blob trigger (``functions.blob_ingest.ingest_blob``) is called with
    what the host would hand it. Each path has its own data folder and one worker pass
    (embedding jobs, then the reindex; the two passes run at once), after which every good image
    must be in the index, be the top hit of a search with its own bytes, and be served back as
    stored (typed by its real format, with ``nosniff``).

    Args:
        data_dir: an empty folder to work in (``http/`` and ``blob/`` are made inside).
        encoder: the image encoder (its input size is used); by default the 64 px one is loaded.
        fashion: how many Fashion-MNIST training images to mix in (good images in the same batch).
        corpus: the files to send (default: :func:`build_corpus`).

    Returns:
        A JSON-ready dict: ``hostile_files`` (corpus size), ``good_files``, ``hostile_crashes`` (5xx
        answers + exceptions out of a handler + failed jobs and images the worker could not
        embed), ``crashes`` (that sum by kind), ``http`` and ``blob`` (``attempts``,
        ``as_expected``, ``server_errors``, ``exceptions``), ``worker`` (job outcomes per path),
        ``indexed`` and ``expected_indexed`` (per path), ``not_found``, ``decode_mismatches``,
        ``mismatches`` (every outcome that differs from what the corpus expects, as text: empty
        when all is well), ``files`` (per corpus file: what it expects and what each path did)
        and ``seconds`` (per stage).
    """
    from fastapi.testclient import TestClient

    from functions.http_api import create_app
    from shared.encoder import ImageEncoder
    from shared.queues import open_job_queues
    from shared.search import SearchService
    from shared.storage import LocalStorage
    from tests.conftest import AUTH, make_settings

    t_start = time.perf_counter()
    files = build_corpus() if corpus is None else corpus
    size = encoder.size if encoder is not None else 64

    def settings_for(path: str) -> Settings:
        return make_settings(
            data_dir / path,
            image_size=size,
            embed_batch_seconds=1,
            index_refresh_seconds=0,
            job_retry_seconds=0,
            job_poll_seconds=0.1,
            **CORPUS_LIMITS,
        )

    paths: dict[str, _Path] = {}
    for path in ("http", "blob"):
        settings = settings_for(path)
        if encoder is None:
            encoder = ImageEncoder(settings.encoder_dir, size=size)
        storage = LocalStorage(settings.data_dir)
        queues = open_job_queues(settings)
        service = SearchService(settings, storage, encoder=encoder)
        client = TestClient(create_app(service, settings, queues), headers=AUTH, raise_server_exceptions=False)
        paths[path] = _Path(settings, storage, queues, service, client)
    assert encoder is not None
    goods = good_images(paths["http"].settings.fashion_mnist_dir, fashion)
    # The good images go in among the hostile files: one batch, shared with the bad ones.
    batch = list(files)
    for i, good in enumerate(goods):
        batch.insert((i + 1) * len(batch) // (len(goods) + 1), good)
    seconds = {"build": time.perf_counter() - t_start}
    detail: dict[str, dict[str, Any]] = {f.name: {"expect": f.expect} for f in files}
    mismatches: list[str] = []

    t0 = time.perf_counter()
    limits = {"max_bytes": CORPUS_LIMITS["max_upload_bytes"], "max_pixels": CORPUS_LIMITS["max_image_pixels"]}
    decode_mismatches = [p for f in files if f.ok and (p := check_decode(f, **limits)) is not None]
    mismatches.extend(decode_mismatches)
    seconds["decode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _send_http(paths["http"], batch, detail, mismatches)
    seconds["http"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _send_blobs(paths["blob"], batch, detail, mismatches)
    seconds["blob"] = time.perf_counter() - t0

    # One worker pass per path, both at once (they mostly wait for batch windows to close).
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="corpus-worker") as pool:
        runs = {name: pool.submit(_work, state, encoder) for name, state in paths.items()}
        outcomes = {name: run.result() for name, run in runs.items()}
    seconds["workers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    wanted = {_id(f): f for f in batch if f.ok}
    failed_jobs = unembedded = 0
    not_found: list[str] = []
    indexed_counts: dict[str, int] = {}
    for name, state in paths.items():
        failed = sum(n for outcome, n in outcomes[name].items() if outcome not in ("succeeded", "duplicate"))
        if failed:
            mismatches.append(f"{name}: worker outcomes {outcomes[name]}")
        failed_jobs += failed
        unembedded += _embed_failures(state.storage, name, mismatches)
        indexed = _indexed_ids(state.service)
        indexed_counts[name] = len(indexed & wanted.keys())
        if indexed - wanted.keys():
            mismatches.append(f"{name}: {len(indexed - wanted.keys())} images indexed that should not be")
        for image_id, file in sorted(wanted.items(), key=lambda kv: kv[1].name):
            problem = _find_by_search(state.client, file.data, image_id, indexed)
            if problem:
                not_found.append(f"{name}:{file.name}")
                mismatches.append(f"{name}: {file.name} {problem}")
            if problem := _check_served(state.client, file):
                mismatches.append(f"{name}: {file.name} {problem}")
    seconds["search"] = time.perf_counter() - t0

    http, blob = paths["http"].tally, paths["blob"].tally
    crashes = {
        "http_5xx": http.server_errors,
        "http_exceptions": http.exceptions,
        "blob_exceptions": blob.exceptions,
        "worker_failures": failed_jobs,
        "embed_failures": unembedded,
    }
    seconds["total"] = time.perf_counter() - t_start
    return {
        "hostile_files": len(files),
        "good_files": len(goods),
        "hostile_crashes": sum(crashes.values()),
        "crashes": crashes,
        "http": vars(http),
        "blob": vars(blob),
        "worker": outcomes,
        "indexed": indexed_counts,
        "expected_indexed": {name: len(wanted) for name in paths},
        "not_found": not_found,
        "decode_mismatches": decode_mismatches,
        "mismatches": mismatches,
        "files": [{"name": name, **d} for name, d in detail.items()],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def _id(file: CorpusFile) -> str:
    return hashlib.sha256(file.data).hexdigest()


def _send_http(path: _Path, batch: list[CorpusFile], detail: dict[str, dict[str, Any]], mismatches: list[str]) -> None:
    """Post every file twice (multipart, then the raw body); check each answer against its expectation."""
    tally = path.tally
    for file in batch:
        answers: list[list[Any]] = []
        for attempt, how in enumerate(("multipart", "raw")):
            tally.attempts += 1
            try:
                r = _post(path.client, file, raw=how == "raw")
            except Exception as exc:  # noqa: BLE001 - a crash is what is being counted
                log.exception("POST /api/images raised on %s", file.name)
                tally.exceptions += 1
                answers.append([type(exc).__name__, None])
                mismatches.append(f"http ({how}): {file.name} raised {type(exc).__name__}")
                continue
            tally.server_errors += r.status_code >= 500
            body = _json(r.content)
            problem = None
            if file.ok:
                want = (201, "added") if attempt == 0 else (200, "duplicate")
                got = (r.status_code, body.get("status") if isinstance(body, dict) else None)
                answers.append(list(got))
                if got != want or body.get("id") != _id(file):
                    problem = f"answered {r.status_code} {r.text[:200]}, expected {want}"
            else:
                code = _error_code(body)
                answers.append([r.status_code, code])
                if code is None:
                    problem = f"answered {r.status_code} without the JSON error shape: {r.text[:200]}"
                elif (r.status_code, code) != file.http:
                    problem = f"answered {(r.status_code, code)}, expected {file.http}: {body['error']['message']}"
            if problem:
                mismatches.append(f"http ({how}): {file.name} {problem}")
            else:
                tally.as_expected += 1
        if file.name in detail:
            detail[file.name]["http"] = answers


def _post(client: TestClient, file: CorpusFile, *, raw: bool) -> Any:
    """``POST /api/images`` with a multipart ``image`` field, or with the raw body and its content type."""
    fields = {"label": file.label} if file.label else {}
    if raw:
        return client.post("/api/images", content=file.data, headers={"Content-Type": file.content_type}, params=fields)
    return client.post("/api/images", files={"image": (file.name, file.data, file.content_type)}, data=fields)


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _error_code(body: Any) -> str | None:
    """The code of a body in the one error shape ``{"error": {"code": str, "message": str}}``, else None."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return None
    err = body["error"]
    if not isinstance(err, dict) or set(err) != {"code", "message"}:
        return None
    if not isinstance(err["code"], str) or not isinstance(err["message"], str) or not err["message"]:
        return None
    if "Traceback" in err["message"]:
        return None
    return err["code"]


@contextmanager
def trigger_runtime(settings: Settings, storage: Storage, queues: JobQueues) -> Iterator[None]:
    """Point the blob trigger at this storage and these queues (it uses the process's runtime otherwise)."""
    from functions import blob_ingest
    from shared.runtime import Runtime

    saved = blob_ingest.get_runtime
    runtime = Runtime(settings, storage, queues)
    blob_ingest.get_runtime = lambda: runtime  # type: ignore[assignment]
    try:
        yield
    finally:
        blob_ingest.get_runtime = saved


def _send_blobs(path: _Path, batch: list[CorpusFile], detail: dict[str, dict[str, Any]], mismatches: list[str]) -> None:
    """Hand every file to the blob trigger as the host would; check its catalogue record or its quarantine reason."""
    import azure.functions as func

    from functions.blob_ingest import ingest_blob
    from shared.catalog import Catalog
    from shared.storage import QUARANTINE

    tally, storage = path.tally, path.storage
    with trigger_runtime(path.settings, storage, path.queues):
        for file in batch:
            tally.attempts += 1
            blob = func.blob.InputStream(
                data=file.data,
                name=f"uploads/incoming/{file.name}",
                length=len(file.data),
                uri=f"https://example.invalid/uploads/incoming/{file.name}",
                metadata={"label": file.label} if file.label else {},
            )
            try:
                ingest_blob(blob)
            except Exception as exc:  # noqa: BLE001 - a crash is what is being counted
                log.exception("the blob trigger raised on %s", file.name)
                tally.exceptions += 1
                mismatches.append(f"blob: {file.name} raised {type(exc).__name__}")
    quarantined: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in storage.list(QUARANTINE):
        if name.endswith(".json"):
            record = storage.get_json(QUARANTINE, name)
            quarantined[str(record.get("source"))] = (name, record)
    catalog = Catalog(storage)
    for file in batch:
        found = quarantined.get(f"blob:uploads/incoming/{file.name}")
        stored = catalog.exists(_id(file))
        problem = None
        if file.ok:
            if found or not stored:
                problem = f"not stored ({found[1].get('code') if found else 'no record'})"
            else:
                image = catalog.get(_id(file))
                if (image.width, image.height) != file.displayed_size:
                    problem = f"recorded as {image.width}x{image.height}, expected {file.displayed_size}"
                elif file.label and image.label != file.label:
                    problem = f"recorded with label {image.label!r}, expected {file.label!r}"
        elif stored:
            problem = "stored, expected quarantine"
        elif found is None:
            problem = "neither stored nor quarantined"
        else:
            name, record = found
            if record.get("code") != file.quarantine_code or not record.get("reason"):
                got = f"{record.get('code')!r} ({record.get('reason')!r})"
                problem = f"quarantined as {got}, expected {file.quarantine_code!r}"
            elif not storage.exists(QUARANTINE, name[: -len(".json")] + ".bin"):
                problem = "quarantine record without its bytes"
        if file.name in detail:
            detail[file.name]["blob"] = "stored" if stored else (found[1].get("code") if found else None)
        if problem:
            mismatches.append(f"blob: {file.name} {problem}")
        else:
            tally.as_expected += 1


def _work(path: _Path, encoder: ImageEncoder) -> dict[str, int]:
    """One worker pass over a path's queues (embedding jobs, then the reindex): its job outcomes."""
    from job.worker import Worker
    from shared.queues import open_queue

    s = path.settings
    worker = Worker(path.storage, s, path.queues, open_queue(s, s.poison_queue_name), encoder=encoder)
    try:
        return worker.run(until_idle=True, idle_timeout=30).outcomes
    except Exception:  # noqa: BLE001 - a crash is what is being counted
        log.exception("the worker crashed on %s", s.data_dir)
        return {"crashed": 1}


def _embed_failures(storage: Storage, path: str, mismatches: list[str]) -> int:
    """Jobs that did not succeed, and images the embedding jobs could not embed."""
    from shared.jobs import JobStore

    failures = 0
    for record in JobStore(storage).recent(200):
        if record.status != "succeeded":
            failures += 1
            mismatches.append(f"{path}: job {record.job_id} ended {record.status}")
        elif record.kind == "embed" and (record.result or {}).get("failed"):
            failures += int(record.result["failed"])
            mismatches.append(f"{path}: job {record.job_id} could not embed {record.result['failed']} images")
    return failures


def _indexed_ids(service: SearchService) -> set[str]:
    try:
        return {str(i) for i in service.index().ids}
    except ClusterlensError:
        return set()


def _find_by_search(client: TestClient, data: bytes, image_id: str, indexed: set[str]) -> str | None:
    """Why the image is not the top hit of a search with its own bytes, or None when it is."""
    if image_id not in indexed:
        return "is not in the index"
    r = client.post("/api/search", files={"image": ("q", data, "application/octet-stream")}, data={"k": "3"})
    if r.status_code != 200:
        return f"search answered {r.status_code} {r.text[:200]}"
    results = r.json().get("results") or [{}]
    if results[0].get("id") != image_id:
        return f"is not the top hit of a search with its own bytes (got {[h.get('id', '')[:8] for h in results]})"
    return None


def _check_served(client: TestClient, file: CorpusFile) -> str | None:
    """Why ``GET /api/images/<id>`` does not give back the stored bytes safely, or None when it does.

    The bytes come back as uploaded, typed by what they are (not by what the uploader said), and
    with ``nosniff``, so a polyglot (a GIF that is also JavaScript) is only ever an image.
    """
    from shared.imaging import CONTENT_TYPES

    r = client.get(f"/api/images/{_id(file)}")
    if r.status_code != 200 or r.content != file.data:
        return f"is not served back as stored ({r.status_code})"
    with Image.open(io.BytesIO(file.data)) as img:
        fmt = "JPEG" if img.format == "MPO" else str(img.format)
    if r.headers.get("content-type") != CONTENT_TYPES[fmt]:
        return f"is served as {r.headers.get('content-type')!r}, not {CONTENT_TYPES[fmt]!r}"
    if r.headers.get("x-content-type-options") != "nosniff":
        return "is served without X-Content-Type-Options: nosniff"
    return None


def corpus_table(files: list[CorpusFile] | None = None) -> list[tuple[str, str]]:
    """(name, expected result) for each file, as a readable table."""
    rows = []
    for f in build_corpus() if files is None else files:
        if f.ok:
            rows.append((f.name, "ok"))
        else:
            blob = f" (blob: {f.blob_code})" if f.blob_code else ""
            rows.append((f.name, f"{f.http[0]} {f.http[1]}{blob}"))
    return rows
