"""`make models`: the ONNX encoders of ``tools/export_models.py`` in ``models/``, exported once per set of inputs.

Exporting takes minutes (torch, int8 calibration on real images, the text encoder and its 1,000
class embeddings), and its output depends only on its inputs:

- the installed packages, name and version (torch, onnx, onnxruntime, the weight packages, ...);
- the data it reads: ``models/imagenet1k_classes.tsv`` and the Fashion-MNIST training files;
- the Python version and the machine;
- the export tool and every project module it imported while exporting (recorded then).

So a finished export is kept in a cache (``~/.cache/clusterlens/models``, or
``$CLUSTERLENS_MODEL_CACHE``) under the hash of those inputs, and a clean clone copies it into
``models/`` instead of exporting again. Any change to an input (a new pin, an edited module the export
imports, other data) misses the cache and exports afresh. The tests then check the models
themselves (parity with torch and ImageNet top-1 on real photos), whichever way they arrived.

Run with the project's venv python from the repository root; ``--no-cache`` exports regardless.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
OUTPUTS = ("efficientnet_lite0", "efficientnet_lite0_int8", "efficientnet_lite0_fp16", "minilm_l6")
STAMP = MODELS / ".inputs.json"  # what the models now in models/ were made from
KEEP = 6  # cache entries kept (least recently used go first)


def cache_root() -> Path:
    explicit = os.environ.get("CLUSTERLENS_MODEL_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clusterlens" / "models"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fashion_mnist_dir() -> Path:
    """Where the export reads its calibration images (the settings' default, or the variable)."""
    sys.path.insert(0, str(ROOT))
    from shared.settings import Settings

    return Path(Settings(_env_file=None).fashion_mnist_dir)  # type: ignore[call-arg]


def base_inputs() -> dict[str, object]:
    """Every input but the project modules the export imports."""
    packages = sorted(
        f"{(d.metadata['Name'] or '?').lower()}=={d.version}"
        for d in metadata.distributions()
        if (d.metadata["Name"] or "").lower() != "clusterlens"
    )
    data_dir = fashion_mnist_dir()
    data = {
        "models/imagenet1k_classes.tsv": sha256(MODELS / "imagenet1k_classes.tsv"),
        **{
            f"fashion-mnist/{name}": sha256(data_dir / name)
            for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
        },
    }
    return {
        "python": sys.version,
        "machine": platform.machine(),
        "packages": packages,
        "data": data,
        "tool": {p: sha256(ROOT / p) for p in ("tools/export_models.py", "scripts/models.py")},
    }


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def modules_match(modules: dict[str, str]) -> bool:
    """True if every recorded project module still has the content it had at export time."""
    return all((ROOT / rel).is_file() and sha256(ROOT / rel) == want for rel, want in modules.items())


def verify() -> None:
    """Hash every model in models/ against its manifest (sha256 and byte size): the one full check, here and
    before the upload to the share (docs/deploy.md); the query side then checks only the size at start."""
    for name in OUTPUTS:
        manifest = json.loads((MODELS / name / "manifest.json").read_text())
        path = MODELS / name / manifest["file"]
        if sha256(path) != manifest["sha256"] or path.stat().st_size != manifest.get("bytes", path.stat().st_size):
            raise SystemExit(f"models: {path} does not match its manifest (run `make models` with --no-cache)")


def present() -> bool:
    return all((MODELS / name / "manifest.json").is_file() for name in OUTPUTS)


def lookup(entries: Path) -> Path | None:
    """The cached export whose recorded modules match the work tree, if any."""
    if not entries.is_dir():
        return None
    for entry in sorted(entries.iterdir()):
        record = entry / "modules.json"
        if record.is_file() and modules_match(json.loads(record.read_text())):
            return entry
    return None


def install(entry: Path) -> None:
    """Copy a cached export into models/ (copies: the export writes some files in place)."""
    for name in OUTPUTS:
        tmp = MODELS / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(entry / name, tmp)
        shutil.rmtree(MODELS / name, ignore_errors=True)
        tmp.rename(MODELS / name)


def export() -> dict[str, str]:
    """Run the export here, in this process; returns the project modules it imported, with their hashes."""
    sys.path.insert(0, str(ROOT))
    from tools import export_models

    if export_models.main(["--models-dir", str(MODELS)]) != 0:
        raise SystemExit("the export failed")
    modules = {}
    for module in list(sys.modules.values()):
        path = Path(getattr(module, "__file__", None) or "/").resolve()
        if path.is_relative_to(ROOT) and ".venv" not in path.relative_to(ROOT).parts and path.is_file():
            modules[str(path.relative_to(ROOT))] = sha256(path)
    return modules


def save(entries: Path, modules: dict[str, str]) -> Path:
    """Store models/ as a cache entry (written aside, then renamed: a concurrent run keeps its own)."""
    entries.mkdir(parents=True, exist_ok=True)
    final = entries / digest(modules)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entries))
    for name in OUTPUTS:
        shutil.copytree(MODELS / name, tmp / name)
    (tmp / "modules.json").write_text(json.dumps(modules, indent=1, sort_keys=True) + "\n")
    try:
        tmp.rename(final)
    except OSError:  # another run stored the same export first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune(root: Path) -> None:
    """Keep the KEEP most recently used entries."""
    entries = [e for base in root.iterdir() if base.is_dir() for e in base.iterdir() if not e.name.startswith(".")]
    for old in sorted(entries, key=lambda e: e.stat().st_mtime, reverse=True)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-cache", action="store_true", help="export even if a cached export matches")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    base = digest(base_inputs())
    if not args.no_cache and present() and STAMP.is_file():
        stamp = json.loads(STAMP.read_text())
        if stamp.get("base") == base and modules_match(stamp.get("modules", {})):
            verify()
            print(f"models: up to date ({base}), sha256 checked")
            return 0
    root = cache_root()
    entries = root / base
    hit = None if args.no_cache else lookup(entries)
    if hit is not None:
        install(hit)
        os.utime(hit)  # recently used
        modules = json.loads((hit / "modules.json").read_text())
        how = f"copied from the cache {hit}"
    else:
        modules = export()
        try:
            how = f"exported and cached in {save(entries, modules)}"
            prune(root)
        except OSError as exc:  # a read-only or full cache: the export itself is done
            how = f"exported (not cached: {exc})"
    verify()
    STAMP.write_text(json.dumps({"base": base, "modules": modules}, indent=1, sort_keys=True) + "\n")
    print(f"models: {how} in {time.perf_counter() - started:.1f} s, sha256 checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
