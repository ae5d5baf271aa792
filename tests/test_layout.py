"""Project rules that break silently: a light query path, every setting documented, thin app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydantic import AliasChoices

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "sklearn", "umap", "pyarrow", "skimage", "lightgbm", "matplotlib", "numba", "onnxmltools", "skl2onnx")


def test_query_path_imports_nothing_heavy(collection) -> None:  # type: ignore[no-untyped-def]
    """Import the function app and answer a real search in a fresh interpreter: no heavy modules."""
    code = """
import sys, json
import function_app
from fastapi.testclient import TestClient
from functions.http_api import create_app
client = TestClient(create_app())
first = client.post("/api/search", json={"id": sys.argv[1], "k": 3})
assert first.status_code == 200, first.text
image = client.get(first.json()["results"][1]["url"]).content
second = client.post("/api/search", files={"image": ("q.png", image, "image/png")})
assert second.status_code == 200, second.text
print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
"""
    image_id = str(collection.service.index().ids[0])
    env = {"CLUSTERLENS_DATA_DIR": str(collection.settings.data_dir), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code, image_id], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "onnxruntime" in loaded and "faiss" in loaded
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_every_setting_is_in_local_settings_example() -> None:
    values = json.loads((ROOT / "local.settings.json.example").read_text())["Values"]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if isinstance(alias, AliasChoices) else f"CLUSTERLENS_{name.upper()}"
        assert env in values, name
        if isinstance(alias, AliasChoices):
            assert Settings.model_validate({env: values[env]}).model_dump()[name] == values[env]
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    # The timer bindings read their schedules from app settings by these names.
    assert {"REINDEX_SCHEDULE", "RETRAIN_SCHEDULE"} <= set(values)


def test_settings_come_from_prefixed_environment(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CLUSTERLENS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CLUSTERLENS_INDEX_NPROBE", "3")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.data_dir == tmp_path and settings.index_nprobe == 3
    monkeypatch.setenv("CLUSTERLENS_STORAGE_BACKEND", "azure")
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_function_app_only_assembles() -> None:
    source = (ROOT / "function_app.py").read_text()
    assert "AsgiFunctionApp" in source and len(source.splitlines()) < 20
    reqs = [
        line.split("==")[0].strip().lower()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "onnxruntime" in reqs and not {"torch", "torchvision", "timm", "scikit-learn"} & set(reqs)
