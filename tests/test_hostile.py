"""Hostile and odd files through the HTTP upload and the blob trigger: nothing crashes, every bad file is
refused with its status and code (and quarantined with its reason), every good one is indexed and found,
and odd-but-valid images decode to the right pixels."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from job.datasets import fashion_mnist_items
from shared.encoder import ImageEncoder
from shared.errors import ClusterlensError
from shared.imaging import decode_image
from tests.conftest import make_settings
from tests.hostile import CORPUS_LIMITS, CorpusFile, build_corpus, check_decode, run_corpus, source_rgb

CORPUS = build_corpus()
BY_NAME = {f.name: f for f in CORPUS}
# Pillow warns about what these files are made of (bombs, broken EXIF): expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning"),
    pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning"),
]
LIMITS = {"max_bytes": CORPUS_LIMITS["max_upload_bytes"], "max_pixels": CORPUS_LIMITS["max_image_pixels"]}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole corpus, with 8 Fashion-MNIST images mixed in, through both paths (one worker pass each)."""
    settings = make_settings(Path("/nonexistent"), image_size=64)
    encoder = ImageEncoder(settings.encoder_dir, size=64)
    return run_corpus(tmp_path_factory.mktemp("hostile"), encoder=encoder, fashion=8, corpus=CORPUS)


def test_the_corpus_covers_what_the_issue_asks_for() -> None:
    assert len(CORPUS) >= 30
    expected = [f.expect for f in CORPUS]
    for kind in [(400, "invalid_image"), (400, "image_too_large"), (415, "unsupported_media_type")]:
        assert expected.count(kind) >= 8, kind
    assert (413, "payload_too_large") in expected and (400, "empty_upload") in expected
    assert expected.count("ok") >= 25
    assert all(
        len(f.data) <= CORPUS_LIMITS["max_upload_bytes"] for f in CORPUS if f.expect != (413, "payload_too_large")
    )


def test_nothing_crashes(report: dict[str, Any]) -> None:
    assert report["hostile_files"] == len(CORPUS) and report["good_files"] == 8
    assert report["crashes"] == {
        "http_5xx": 0,
        "http_exceptions": 0,
        "blob_exceptions": 0,
        "worker_failures": 0,
        "embed_failures": 0,
    }
    assert report["hostile_crashes"] == 0
    assert set(report["worker"]["http"]) <= {"succeeded", "duplicate"}
    assert set(report["worker"]["blob"]) <= {"succeeded", "duplicate"}


def test_every_file_gets_the_answer_it_should(report: dict[str, Any]) -> None:
    """Over HTTP (multipart and raw body) and through the blob trigger, nothing differs from the expectation."""
    assert report["mismatches"] == []
    sent = len(CORPUS) + report["good_files"]
    assert report["http"]["as_expected"] == report["http"]["attempts"] == 2 * sent
    assert report["blob"]["as_expected"] == report["blob"]["attempts"] == sent


def test_bad_files_are_refused_over_http_in_the_one_error_shape(report: dict[str, Any]) -> None:
    for entry in report["files"]:
        file = BY_NAME[entry["name"]]
        if file.ok:
            assert entry["http"] == [[201, "added"], [200, "duplicate"]], entry
        else:  # the runner records a code only for a body that is exactly {"error": {"code", "message"}}
            assert entry["http"] == [list(file.http)] * 2, entry


def test_bad_files_are_quarantined_with_their_reason_by_the_blob_trigger(report: dict[str, Any]) -> None:
    for entry in report["files"]:
        file = BY_NAME[entry["name"]]
        assert entry["blob"] == ("stored" if file.ok else file.quarantine_code), entry


def test_good_images_in_the_same_batch_are_all_indexed_and_found(report: dict[str, Any]) -> None:
    good = sum(f.ok for f in CORPUS) + report["good_files"]
    assert report["expected_indexed"] == {"http": good, "blob": good}
    assert report["indexed"] == {"http": good, "blob": good}
    assert report["not_found"] == []


@pytest.mark.parametrize("name", [f.name for f in CORPUS if f.ok])
def test_odd_images_decode_correctly(name: str) -> None:
    """Each odd-but-valid image decodes to its known pixels (see the corpus for what each one checks)."""
    assert check_decode(BY_NAME[name], **LIMITS) is None


def test_odd_decodes_in_detail() -> None:
    """The rules the pixel checks stand for, spelt out on a few of them."""
    upright = decode_image(BY_NAME["exif6_jpeg"].data, **LIMITS)
    assert (upright.width, upright.height) == (48, 32)  # as displayed, not as stored (32 x 48)
    corner = np.asarray(upright.rgb)[:10, :12].astype(int).mean(axis=(0, 1))
    assert np.abs(corner - source_rgb(10)[0, 0]).max() < 8  # the marked corner is top-left again
    sixteen = np.asarray(decode_image(BY_NAME["png16_grey"].data, **LIMITS).rgb)
    assert 178 <= sixteen.max() <= 181 and 39 <= sixteen.min() <= 41  # scaled by 255/65535: not clipped, not stretched
    palette = np.asarray(decode_image(BY_NAME["palette_png_transparency"].data, **LIMITS).rgb)
    assert (palette[0, 0] == 255).all()  # palette index 0 is fully transparent: white
    first = np.asarray(decode_image(BY_NAME["animated_webp"].data, **LIMITS).rgb)
    assert np.array_equal(first, source_rgb(15))  # the first frame, exactly
    assert decode_image(BY_NAME["very_wide_png"].data, **LIMITS).rgb.size == (10000, 3)
    assert decode_image(BY_NAME["one_by_one_png"].data, **LIMITS).rgb.getpixel((0, 0)) == (12, 200, 34)
    cmyk = np.asarray(decode_image(BY_NAME["cmyk_jpeg"].data, **LIMITS).rgb).astype(int)
    assert np.abs(cmyk - source_rgb(1)).mean() < 3


def _encode(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(source_rgb(50, 16, 12)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_every_truncation_is_refused(fmt: str) -> None:
    """Cut anywhere, an image is refused as invalid, never decoded from what is left (GIF: its trailer byte
    and last block terminator carry no pixels, so a GIF missing only those still decodes)."""
    data = _encode(fmt)
    spare = 2 if fmt == "GIF" else 0
    for n in range(1, len(data) - spare):
        with pytest.raises(ClusterlensError) as caught:
            decode_image(data[:n], **LIMITS)
        assert caught.value.code in ("invalid_image", "unsupported_media_type"), (fmt, n, caught.value.code)
        if n >= 16:
            assert caught.value.code == "invalid_image", (fmt, n)


def test_a_fashion_mnist_png_cut_before_its_checksum_is_refused(tmp_path: Path) -> None:
    """The first suspect: Pillow stops once the last row is inflated, so a PNG cut after its image data
    (losing the zlib checksum, the IDAT CRC and IEND) used to decode without complaint."""
    item = next(iter(fashion_mnist_items(make_settings(tmp_path).fashion_mnist_dir, "train", limit=1)))
    assert decode_image(item.data, **LIMITS).rgb.size == (28, 28)
    for n in range(len(item.data) - 24, len(item.data)):
        with pytest.raises(ClusterlensError, match="truncated") as caught:
            decode_image(item.data[:n], **LIMITS)
        assert caught.value.code == "invalid_image"


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_pillow_bomb_guard_and_the_setting_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever limit is lower wins, and both answer 400 image_too_large, never a server error."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns over 1000 pixels, refuses over 2000
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_image(_png(40, 30), max_bytes=10**6, max_pixels=10_000).width == 40  # ours allows 1200
    with pytest.raises(ClusterlensError, match="2000-pixel limit") as caught:
        decode_image(_png(50, 50), max_bytes=10**6, max_pixels=10_000)  # Pillow refuses at open
    assert (caught.value.status, caught.value.code) == (400, "image_too_large")
    with (
        pytest.raises(ClusterlensError, match="the limit is 100 pixels") as caught,
        pytest.warns(Image.DecompressionBombWarning),
    ):
        decode_image(_png(40, 30), max_bytes=10**6, max_pixels=100)  # ours is lower
    assert caught.value.code == "image_too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's guard off: ours still holds
    with pytest.raises(ClusterlensError, match="the limit is 100 pixels"):
        decode_image(_png(50, 50), max_bytes=10**6, max_pixels=100)


def test_corpus_files_are_what_they_say() -> None:
    """A few sanity checks on the corpus itself, so a Pillow upgrade cannot quietly defang it."""
    assert (
        BY_NAME["png_truncated_to_60_bytes"].data.startswith(b"\x89PNG")
        and len(BY_NAME["png_truncated_to_60_bytes"].data) == 60
    )
    assert BY_NAME["gif_js_polyglot"].data.startswith(b"GIF89a/*") and BY_NAME["gif_js_polyglot"].data.endswith(
        b"*/=alert(document.domain);//"
    )
    with Image.open(io.BytesIO(BY_NAME["animated_gif"].data)) as gif:
        assert getattr(gif, "n_frames", 1) == 3
    with Image.open(io.BytesIO(BY_NAME["animated_webp"].data)) as webp:
        assert getattr(webp, "n_frames", 1) == 3
    with Image.open(io.BytesIO(BY_NAME["cmyk_jpeg"].data)) as cmyk:
        assert cmyk.mode == "CMYK"
    with Image.open(io.BytesIO(BY_NAME["png16_grey"].data)) as grey16:
        assert grey16.mode.startswith("I;16")
    with Image.open(io.BytesIO(BY_NAME["mpo_camera_jpeg"].data)) as mpo:
        assert mpo.format == "MPO"
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(BY_NAME["png_bomb_100000x100000"].data))
    assert len(BY_NAME["oversized_png"].data) > CORPUS_LIMITS["max_upload_bytes"]
    assert isinstance(BY_NAME["zero_bytes"], CorpusFile) and BY_NAME["zero_bytes"].quarantine_code == "empty_image"


def _hostile_json() -> dict[str, bytes]:
    """JSON bodies built to hurt a parser: nested thousands deep (once a 500: RecursionError in the
    decoder), deep inside an otherwise well-formed body, and brackets hidden in strings (no harm)."""
    deep = 1500  # past Python's recursion limit (1000), small enough for every endpoint's body bound
    return {
        "deep_array": b"[" * deep + b"]" * deep,
        "deep_object": b'{"a":' * deep + b"1" + b"}" * deep,
        "deep_in_a_field": b'{"kind": "reindex", "labels": ' + b"[" * deep + b"]" * deep + b', "id": "x"}',
        "unterminated_deep": b"[" * deep,
    }


def test_deep_json_is_a_400_on_every_json_endpoint(full_collection: Path) -> None:
    """Every operation that takes JSON (found from the app's own schema) answers 400 invalid_json."""
    import shutil

    from fastapi.testclient import TestClient

    from functions.http_api import create_app
    from tests.conftest import AUTH
    from tests.full_collection import settings_for

    data_dir = full_collection.parent / "hostile-json"
    shutil.copytree(full_collection, data_dir, dirs_exist_ok=True)
    client = TestClient(create_app(settings=settings_for(data_dir)), raise_server_exceptions=False, headers=AUTH)
    paths = client.get("/api/openapi.json").json()["paths"]
    operations = [
        (method, path)
        for path, ops in paths.items()
        for method, op in ops.items()
        if "application/json" in op.get("requestBody", {}).get("content", {})
    ]
    assert {("post", "/api/search"), ("post", "/api/jobs"), ("post", "/api/labels")} <= set(operations)
    assert {("put", "/api/label-set"), ("post", "/api/index/rollback")} <= set(operations)
    for method, path in operations:
        codes = set()
        for name, body in _hostile_json().items():
            resp = client.request(method.upper(), path, content=body, headers={"Content-Type": "application/json"})
            code = resp.json()["error"]["code"]
            assert (resp.status_code, code) in ((400, "invalid_json"), (413, "payload_too_large")), (path, name, code)
            codes.add(code)
        assert "invalid_json" in codes, path  # refused for its depth, not only for its size
        quoted = b'{"text": "' + b"[" * 2000 + b'", "kind": "reindex", "classes": ["a"]}'  # brackets in a string
        headers = {"Content-Type": "application/json"}
        assert client.request(method.upper(), path, content=quoted, headers=headers).status_code < 500
