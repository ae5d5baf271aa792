"""Issue 22: a cold start of the query side checks each model file's byte size against its manifest; the
full sha256 is computed once at export and checked by `make models` and the jobs (``verify="sha256"``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared.encoder import ImageEncoder
from shared.errors import NotReady
from shared.sessions import file_sha256, verify_file
from shared.settings import PROJECT_ROOT
from shared.text_encoder import TextEncoder

MODELS = PROJECT_ROOT / "models"
FOLDERS = ("efficientnet_lite0", "efficientnet_lite0_int8", "efficientnet_lite0_fp16", "minilm_l6")


@pytest.fixture
def fp32(tmp_path: Path) -> Path:
    """A copy of the exported fp32 encoder (`make models`), to damage."""
    if not (MODELS / "efficientnet_lite0" / "manifest.json").is_file():
        pytest.fail("models/efficientnet_lite0 is missing: run `make models` (make test does)")
    return Path(shutil.copytree(MODELS / "efficientnet_lite0", tmp_path / "efficientnet_lite0"))


def _flip_a_weight_byte(path: Path) -> None:
    """Change one byte three quarters into the file (inside a weight tensor): same size, other content."""
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_exported_manifest_records_its_files_size_and_hash() -> None:
    for name in FOLDERS:
        manifest = json.loads((MODELS / name / "manifest.json").read_text())
        path = MODELS / name / manifest["file"]
        assert manifest["bytes"] == path.stat().st_size, name  # so a start never hashes
        assert manifest["sha256"] == file_sha256(path), name


def test_a_start_checks_the_size_and_the_jobs_check_the_hash(fp32: Path) -> None:
    model = fp32 / "model.onnx"
    _flip_a_weight_byte(model)
    encoder = ImageEncoder(fp32)  # the query side's default: the size matches, nothing is hashed
    assert encoder.manifest.bytes == model.stat().st_size
    with pytest.raises(NotReady) as caught:
        ImageEncoder(fp32, verify="sha256")  # the export, `make models` and the jobs
    assert caught.value.code == "model_corrupt"


def test_a_file_of_another_size_is_refused_at_start(fp32: Path) -> None:
    model = fp32 / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1000])  # cut short (an upload that stopped)
    with pytest.raises(NotReady) as caught:
        ImageEncoder(fp32)
    assert caught.value.code == "model_corrupt" and "bytes" in caught.value.message
    model.unlink()
    with pytest.raises(NotReady) as caught:
        ImageEncoder(fp32)
    assert caught.value.code == "model_missing"


def test_a_manifest_without_a_size_falls_back_to_the_hash(fp32: Path) -> None:
    manifest = json.loads((fp32 / "manifest.json").read_text())
    del manifest["bytes"]
    (fp32 / "manifest.json").write_text(json.dumps(manifest))
    model = fp32 / "model.onnx"
    assert verify_file(model, manifest["sha256"], size=None, verify="size") == model  # hashed, and it matches
    _flip_a_weight_byte(model)
    with pytest.raises(NotReady) as caught:
        ImageEncoder(fp32)
    assert caught.value.code == "model_corrupt" and "sha256" in caught.value.message


def test_the_text_encoder_checks_its_size_too(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(MODELS / "minilm_l6", tmp_path / "minilm_l6"))
    assert TextEncoder(folder).encode(["a cat"]).shape == (1, 384)
    model = folder / "model.onnx"
    with open(model, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(NotReady) as caught:
        TextEncoder(folder)
    assert caught.value.code == "model_corrupt"
