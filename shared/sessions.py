"""One way to open an ONNX model: the providers this installation has (CUDA first where present),
the thread count, quiet logs, and the file checked against its manifest (its sha256, or at a cold start of
the query side only its byte size: see :func:`verify_file`).

Every model (image encoder, text encoder, projection head, label classifier) opens through
:func:`open_session`, so a GPU node and a CPU node differ only in what ONNX Runtime reports.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared.errors import NotReady

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)
CPU = ["CPUExecutionProvider"]
# How a model file is checked against its manifest: "size" (a stat: what the query side does at every cold
# start), "sha256" (reads the whole file: the export, `make models` and the jobs), "none".
Verify = Literal["size", "sha256", "none"]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(
    path: Path,
    sha256: str | None,
    *,
    size: int | None = None,
    verify: Verify = "sha256",
    fix: str = "rebuild with `make models`",
) -> Path:
    """``path`` if it exists and matches its manifest.

    The sha256 was computed once, when the model was exported; hashing the whole file again at every cold
    start of the query side (18 MB to 90 MB per model, read from the models share) costs more than the
    start itself, so ``verify="size"`` compares the byte size the manifest records, which catches a file
    cut short or replaced by another export. A manifest without a size is checked by its sha256.

    Args:
        sha256: the manifest's hash (None: not checked).
        size: the manifest's byte size, if it records one.
        verify: ``"size"``, ``"sha256"`` or ``"none"`` (existence only).

    Raises:
        NotReady: missing (``model_missing``) or not matching (``model_corrupt``).
    """
    path = Path(path)
    if not path.is_file():
        raise NotReady(f"model file {path} is missing; {fix}", code="model_missing")
    if verify == "none":
        return path
    if verify == "size" and size is not None:
        if path.stat().st_size != size:
            raise NotReady(f"{path} is not the {size} bytes its manifest records; {fix}", code="model_corrupt")
        return path
    if sha256 is not None and file_sha256(path) != sha256:
        raise NotReady(f"{path} does not match its manifest's sha256; {fix}", code="model_corrupt")
    return path


def pick_providers(preferred: list[str] | None) -> list[str]:
    """The preferred ONNX Runtime providers that this installation actually has, in order (CPU if none)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in preferred or CPU if p in available]
    return chosen or CPU


def open_session(model: Path | bytes, *, providers: list[str] | None = None, intra_op_threads: int = 0) -> Any:
    """An ``onnxruntime.InferenceSession`` on the first available of ``providers``.

    Args:
        model: an ONNX file, or its bytes.
        providers: preferred execution providers (default CPU); unavailable ones are skipped.
        intra_op_threads: ONNX Runtime's thread count, 0 for its default.

    Returns:
        the session; ``session.get_providers()`` says what it runs on.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's concern
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=pick_providers(providers))


def session_options(settings: Settings) -> dict[str, Any]:
    """``providers`` and ``intra_op_threads`` as the settings ask (keyword arguments of every model)."""
    return {"providers": list(settings.ort_providers), "intra_op_threads": settings.ort_intra_op_threads}
