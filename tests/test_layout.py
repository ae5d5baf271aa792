"""Project rules that break silently: a light query path, every setting documented, thin app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pydantic import AliasChoices

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# the analysis job's extras: UMAP (and its numba stack) and the ONNX converters for its classifiers
ANALYSIS = ("umap-learn", "numba", "llvmlite", "pynndescent", "onnxmltools", "skl2onnx", "onnxconverter-common")
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


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line} is not pinned"
            pins[name.lower()] = version
    return pins


def test_job_image_pins_the_same_versions_as_the_function_app() -> None:
    """The job and the function app run the same shared library: same versions, GPU runtime in the job."""
    app, job = _pins(ROOT / "requirements.txt"), _pins(ROOT / "job" / "requirements.txt")
    assert "onnxruntime" not in job and job["onnxruntime-gpu"] == app["onnxruntime"]
    assert job["torch"] == "2.13.0"
    host_only = {"azure-functions", "fastapi", "uvicorn", "python-multipart", "onnxruntime"}
    job_only = ("onnxruntime-gpu", "torch", "scikit-learn", "lightgbm", "matplotlib", *ANALYSIS)  # job side
    assert {k: v for k, v in app.items() if k not in host_only} == {k: v for k, v in job.items() if k not in job_only}
    tools = _pins(ROOT / "requirements-models.txt")  # what the tests and the CLI train with
    assert all(job[name] == tools[name] for name in job_only[1:])
    assert not set(job_only[1:]) & set(app)  # the function app stays light
    dockerfile = (ROOT / "job" / "Dockerfile").read_text()
    # onnxruntime-gpu 1.31's CUDA provider links CUDA 13 and cuDNN 9 (readelf on the wheel).
    assert "FROM nvidia/cuda:13." in dockerfile and "cudnn" in dockerfile
    assert 'ENTRYPOINT ["python", "-m", "job"]' in dockerfile
