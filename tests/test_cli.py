"""The installed `clusterlens` command, run as a user would, in a fresh data dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import png

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "tools.cli"]


def run(args: list[str], data_dir: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLUSTERLENS_DATA_DIR": str(data_dir), "TQDM_DISABLE": "1"}
    proc = subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_ingest_embed_reindex_search_and_idempotency(tmp_path: Path) -> None:
    data = tmp_path / "data"
    folder = tmp_path / "imgs"
    (folder / "light").mkdir(parents=True)
    (folder / "dark").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (folder / "light" / f"{i}.png").write_bytes(png(rng.integers(180, 255, (32, 32), dtype=np.uint8)))
        (folder / "dark" / f"{i}.png").write_bytes(png(rng.integers(0, 60, (32, 32), dtype=np.uint8)))
    (folder / "dark" / "junk.png").write_bytes(b"junk")

    out = run(["ingest", str(folder)], data).stdout
    assert "added 8, already known 0, quarantined 1" in out and "junk.png" in out
    out = run(["ingest", "--dataset", "fashion-mnist", "--limit", "60"], data).stdout
    assert "added 60" in out

    first = run(["embed"], data).stdout
    assert "embedded 68 of 68" in first
    second = run(["embed"], data).stdout
    assert "embedded 0 of 0" in second  # idempotent: nothing embedded twice

    out = run(["reindex"], data).stdout
    assert "index v000001 built and published 68 images" in out and "recall@10 1.0" in out
    assert "up to date" in run(["reindex"], data).stdout
    assert "index v000002 built and published" in run(["reindex", "--force"], data).stdout
    assert "v000002 -> v000001" in run(["index", "rollback"], data).stdout
    listing = run(["index", "list"], data).stdout
    assert "*  v000001" in listing and "   v000002" in listing
    proc = run(["index", "rollback"], data, check=False)
    assert proc.returncode == 1 and "nothing to roll back to" in proc.stderr
    run(["index", "rollback", "--to", "v000002"], data)

    query = folder / "light" / "0.png"
    body = json.loads(run(["search", "--image", str(query), "--k", "4", "--json"], data).stdout)
    assert len(body["results"]) == 4 and body["results"][0]["label"] == "light"
    dark = json.loads(run(["search", "--image", str(query), "--k", "4", "--label", "dark", "--json"], data).stdout)
    assert [r["label"] for r in dark["results"]] == ["dark"] * 4
    by_id = json.loads(run(["search", "--id", body["results"][0]["id"], "--json"], data).stdout)
    assert by_id["results"][0]["id"] == body["results"][0]["id"]


def test_train_head_then_index_in_its_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    run(["ingest", "--dataset", "fashion-mnist", "--limit", "200"], data)
    run(["embed"], data)
    proc = run(["train-head", "--epochs", "5"], data, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "projection head v000001 trained on 180 labelled images (10 classes, cpu" in proc.stdout
    assert "CLUSTERLENS_INDEX_SPACE=head" in proc.stdout
    monkeypatch.setenv("CLUSTERLENS_INDEX_SPACE", "head")
    assert "built and published" in run(["reindex"], data).stdout
    manifest = json.loads((data / "index" / "v000001" / "manifest.json").read_text())
    assert (
        manifest["space"] == "head" and manifest["dim"] == 64 and (data / "index" / "v000001" / "head.onnx").is_file()
    )
    some_id = sorted(p.stem for p in (data / "embeddings" / "records").glob("*.json"))[0]
    body = json.loads(run(["search", "--id", some_id, "--k", "3", "--json"], data).stdout)
    assert body["results"][0]["id"] == some_id


def test_train_head_needs_labels(tmp_path: Path) -> None:
    data = tmp_path / "data"
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        (folder / f"{i}.png").write_bytes(png(rng.integers(0, 255, (32, 32), dtype=np.uint8)))
    run(["ingest", str(folder)], data)
    run(["embed"], data)
    proc = run(["train-head"], data, check=False)
    assert proc.returncode == 1 and "at least 20 labelled images" in proc.stderr and "Traceback" not in proc.stderr


def test_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    proc = run(["search", "--id", "a" * 64], tmp_path, check=False)
    assert proc.returncode == 1 and "reindex" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(["ingest", str(tmp_path / "missing")], tmp_path, check=False)
    assert proc.returncode == 1 and "not a folder" in proc.stderr
    proc = run(["ingest"], tmp_path, check=False)
    assert proc.returncode == 2
    proc = run(["search", "--id", "nope"], tmp_path, check=False)
    assert proc.returncode == 1 and "64 lowercase hex" in proc.stderr


def test_bad_settings_are_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLUSTERLENS_INDEX_NPROBE", "-1")
    proc = run(["reindex"], tmp_path, check=False)
    assert proc.returncode == 2 and "CLUSTERLENS_INDEX_NPROBE" in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.setenv("CLUSTERLENS_INDEX_NPROBE", "0")
    monkeypatch.setenv("CLUSTERLENS_STORAGE_BACKEND", "azure")
    monkeypatch.setenv(
        "CLUSTERLENS_AZURE_STORAGE_CONNECTION_STRING",
        "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/a;",
    )
    proc = run(["embed"], tmp_path, check=False)  # nothing listens on port 9: a clear error, at once
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot reach Azure Storage at http://127.0.0.1:9" in proc.stderr, proc.stderr
