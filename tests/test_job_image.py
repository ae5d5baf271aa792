"""The container job's two images (job/Dockerfile): what each installs, and that the GPU one resolves.

The GPU image must really be able to use its GPU for training as well as for embedding, so its torch is
the CUDA build (PyPI's Linux x86_64 wheel of torch 2.13.0 is CUDA 13.0), matching the CUDA 13 + cuDNN 9
base image that onnxruntime-gpu 1.31.1 needs; the CPU image and every other environment keep the CPU
wheel. No Docker engine runs here, so instead of building the image this resolves its requirements for
the image's platform (linux x86_64, CPython 3.11, wheels only) against PyPI with uv, the way pip would
resolve them in the image, and reads what came out.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "job"
UV = ROOT / ".venv" / "bin" / "uv"
# the analysis job's extras: UMAP (and its numba stack) and the ONNX converters for its classifiers
ANALYSIS = ("umap-learn", "numba", "llvmlite", "pynndescent", "onnxmltools", "skl2onnx", "onnxconverter-common")
LABEL_ISSUES = ("cleanlab", "pandas", "python-dateutil", "pytz", "tzdata", "termcolor")  # cleanlab and its imports


def pins(path: Path) -> dict[str, str]:
    """name -> version of every requirement in a file, following `-r` includes; all must be pinned."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            found |= pins(path.parent / line[3:].strip())
        elif line and not line.startswith("-"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line} is not pinned"
            found[name.lower()] = version
    return found


def test_both_images_pin_the_same_versions_as_the_function_app() -> None:
    """The jobs and the function app run the same shared library: same versions, each image with its runtime."""
    app = pins(ROOT / "requirements.txt")
    common, gpu, cpu = (
        pins(JOB / "requirements.txt"),
        pins(JOB / "requirements-gpu.txt"),
        pins(JOB / "requirements-cpu.txt"),
    )
    assert not {"onnxruntime", "onnxruntime-gpu", "torch"} & set(common)
    assert gpu["onnxruntime-gpu"] == cpu["onnxruntime"] == app["onnxruntime"] and "onnxruntime" not in gpu
    tools = pins(ROOT / "requirements-models.txt")  # what the tests and the CLI train with (CPU wheel)
    assert gpu["torch"] == cpu["torch"] == tools["torch"] == "2.13.0"
    host_only = {"azure-functions", "fastapi", "uvicorn", "python-multipart", "onnxruntime"}
    job_only = ("scikit-learn", "lightgbm", "matplotlib", *ANALYSIS, *LABEL_ISSUES)
    assert {k: v for k, v in app.items() if k not in host_only} == {
        k: v for k, v in common.items() if k not in job_only
    }
    assert all(common[name] == tools[name] for name in job_only)
    assert not set(job_only) & set(app)  # the function app stays light
    # the CPU wheel comes from PyTorch's CPU index, only in the CPU image's file; the GPU file has no index
    assert "download.pytorch.org/whl/cpu" in (JOB / "requirements-cpu.txt").read_text()
    assert "--extra-index-url" not in (JOB / "requirements-gpu.txt").read_text()
    assert "--extra-index-url" not in (JOB / "requirements.txt").read_text()


def test_dockerfile_builds_a_gpu_and_a_cpu_runtime() -> None:
    dockerfile = (JOB / "Dockerfile").read_text()
    stages = {name: image for image, name in re.findall(r"^FROM (\S+) AS (\S+)$", dockerfile, re.M)}
    # onnxruntime-gpu 1.31's CUDA provider links CUDA 13 and cuDNN 9 (readelf on the wheel)
    assert stages["runtime-gpu"].startswith("nvidia/cuda:13.") and "cudnn" in stages["runtime-gpu"]
    assert stages["runtime-cpu"].startswith("python:3.11-")
    assert "ARG VARIANT=gpu" in dockerfile and "FROM runtime-${VARIANT}" in dockerfile
    for variant in ("gpu", "cpu"):
        section = dockerfile.split(f" AS runtime-{variant}")[1].split("\nFROM ")[0]
        assert f"-r job/requirements-{variant}.txt" in section, variant
    assert 'ENTRYPOINT ["python", "-m", "job"]' in dockerfile and "/mnt/models" not in dockerfile


def resolve(requirements: Path) -> dict[str, str]:
    """What pip would install from `requirements` on the job image's platform, resolved from PyPI."""
    proc = subprocess.run(
        [
            str(UV), "pip", "compile", str(requirements), "--no-config", "--no-header", "--no-annotate",
            "--python-platform", "x86_64-manylinux_2_28", "--python-version", "3.11", "--only-binary", ":all:",
            "--default-index", "https://pypi.org/simple",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    resolved = dict(line.split("==", 1) for line in proc.stdout.splitlines() if "==" in line)
    return {name.lower(): version for name, version in resolved.items()}


def test_gpu_requirements_resolve_for_the_image_with_the_cuda_13_builds() -> None:
    """Every pin has a wheel for linux x86_64 / CPython 3.11, and torch is the CUDA 13 build with cuDNN 9."""
    resolved = resolve(JOB / "requirements-gpu.txt")
    wanted = pins(JOB / "requirements-gpu.txt")
    assert {name: resolved.get(name) for name in wanted} == wanted
    assert "+" not in resolved["torch"]  # not a local (+cpu) build
    assert resolved["nvidia-cudnn-cu13"].startswith("9.")  # cuDNN 9 for CUDA 13: the base image's pair
    assert resolved["nvidia-cuda-runtime"].startswith("13.0")
    assert "onnxruntime" not in resolved  # nothing pulls the CPU build in beside onnxruntime-gpu


def test_cpu_requirements_resolve_without_torch(tmp_path: Path) -> None:
    """The CPU image's pins other than torch (whose +cpu wheel is on PyTorch's index, not PyPI) resolve
    for the image's platform beside its onnxruntime."""
    cpu = pins(JOB / "requirements-cpu.txt")
    probe = tmp_path / "requirements.txt"
    probe.write_text(f"-r {JOB / 'requirements.txt'}\nonnxruntime=={cpu['onnxruntime']}\n")
    resolved = resolve(probe)
    wanted = {name: version for name, version in cpu.items() if name != "torch"}
    assert {name: resolved.get(name) for name in wanted} == wanted
    assert "torch" not in resolved and "onnxruntime-gpu" not in resolved
