"""Embedding benchmark: torch eager vs ONNX Runtime fp32 and int8, and the end-to-end pipeline.

Run by ``make bench-embed``; writes ``bench/results/embed.json``. Speeds are measured on the same
2,000 real images (the first Fashion-MNIST test images, written out as PNG files), the same batch
size and input size, in one run, so the ratios compare like with like. kNN accuracies are 10-NN
majority votes on the Fashion-MNIST test set with the whole train set as the index (exact cosine
search over power-normalised embeddings, as the index uses); features are cached in
``bench/cache/`` so a second run skips the 70,000-image embedding passes.

This is a benchmark, not a test: it takes about 20 minutes on 2 CPU cores (about 8 with the feature cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from job.datasets import load_fashion_mnist, png_bytes
from job.embeddings import embed_pending
from shared.encoder import ImageEncoder
from shared.features import power_normalize
from shared.ingest import IngestItem, ingest_bytes
from shared.settings import Settings
from shared.storage import LocalStorage

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / "cache"


def _rgb(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(x).convert("RGB") for x in images]


def _rate(fn: Any, batches: list[Any], n: int) -> float:
    fn(batches[0])  # warm-up
    t0 = time.perf_counter()
    for batch in batches:
        fn(batch)
    return n / (time.perf_counter() - t0)


def _features(enc: ImageEncoder, images: np.ndarray, name: str, batch: int) -> np.ndarray:
    path = CACHE / f"{name}-{enc.version}.npy"
    if path.is_file():
        return np.load(path)
    out = []
    for i in tqdm(
        range(0, len(images), batch), desc=f"features {name} ({enc.manifest.to_json()['precision']})", unit="batch"
    ):
        out.append(enc.encode(_rgb(images[i : i + batch])).vectors)
    feats = np.concatenate(out)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    return feats


def knn_accuracy(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, k: int = 10, power: float = 0.5
) -> float:
    """10-NN majority vote accuracy with exact cosine search (faiss flat, power-normalised vectors)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 20
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(power_normalize(train, power))
    _, rows = index.search(power_normalize(test, power), k)
    votes = y_train[rows]
    pred = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
    return float((pred == y_test).mean())


def _head64(
    enc: ImageEncoder, train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, epochs: int
) -> dict[str, Any]:
    """Train the projection head on the train split's fp32 features (10% held out), export it, run it with ORT."""
    from job.datasets import FASHION_MNIST_CLASSES
    from job.train_head import train_head
    from shared.head import ProjectionHead

    names = [FASHION_MNIST_CLASSES[int(y)] for y in y_train]
    with tempfile.TemporaryDirectory(prefix="clusterlens-bench-head-") as tmp:
        trained = train_head(train, names, Path(tmp), encoder_version=enc.version, epochs=epochs)
        head = ProjectionHead(trained.onnx_path, trained.manifest)
        db, queries = head.apply(train).embedding, head.apply(test).embedding
    acc = knn_accuracy(db, y_train, queries, y_test, power=1.0)
    t = trained.manifest.train
    print(f"10-NN accuracy head64: {acc:.4f} (trained {t['seconds']} s on {t['device']})")
    return {
        "knn_acc_head64": round(acc, 4),
        "head64_note": (
            f"head trained on {t['train']} train-split features ({t['held_out']} held out, "
            f"{epochs} epochs, {t['seconds']} s on {t['device']}); the 10-NN index is all 60k train images in 64-d"
        ),
        "head64_train_seconds": t["seconds"],
        "head64_val_accuracy": t["val_accuracy"],
    }


def device() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "embed.json")
    parser.add_argument("--skip-knn", action="store_true", help="speeds only (no 70k-image passes, no head)")
    parser.add_argument("--head-epochs", type=int, default=15)
    args = parser.parse_args(argv)

    import torch

    from tools.export_models import build_wrapper, load_torch_model

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    size = settings.image_size
    fp32 = ImageEncoder(settings.model_dir / "efficientnet_lite0", size=size)
    int8 = ImageEncoder(settings.model_dir / "efficientnet_lite0_int8", size=size)
    fp16 = ImageEncoder(settings.model_dir / "efficientnet_lite0_fp16", size=size, providers=settings.ort_providers)
    x_test, y_test = load_fashion_mnist(settings.fashion_mnist_dir, "test")
    x_train, y_train = load_fashion_mnist(settings.fashion_mnist_dir, "train")
    sample = x_test[: args.images]
    batches = [fp32.preprocess(_rgb(sample[i : i + args.batch])) for i in range(0, len(sample), args.batch)]

    torch.set_num_threads(os.cpu_count() or 1)
    model = build_wrapper(load_torch_model())
    with torch.inference_mode():
        torch_rate = _rate(lambda b: model(torch.from_numpy(b)), batches, len(sample))
    print(f"torch eager {torch_rate:.1f} img/s")
    fp32_rate = _rate(fp32.encode_array, batches, len(sample))
    int8_rate = _rate(int8.encode_array, batches, len(sample))
    fp16_rate = _rate(fp16.encode_array, batches, len(sample))
    print(
        f"ORT fp32 {fp32_rate:.1f} img/s, int8 {int8_rate:.1f} img/s, fp16 {fp16_rate:.1f} img/s ({fp16.providers[0]})"
    )

    with tempfile.TemporaryDirectory(prefix="clusterlens-bench-") as tmp:
        pipe_settings = Settings(_env_file=None, data_dir=Path(tmp), embed_batch_size=args.batch)  # type: ignore[call-arg]
        storage = LocalStorage(pipe_settings.data_dir)
        for i, pixels in enumerate(sample):
            ingest_bytes(storage, pipe_settings, IngestItem(data=png_bytes(pixels), source=f"bench/{i}"))
        stats = embed_pending(storage, pipe_settings, fp32)  # files on disk -> decode -> infer -> write
    pipeline_rate = stats.images_per_second
    print(f"pipeline {pipeline_rate:.1f} img/s, stages {stats.seconds}")

    result: dict[str, Any] = {
        "images": len(sample),
        "batch": args.batch,
        "input_px": size,
        "torch_eager_img_s": round(torch_rate, 1),
        "ort_fp32_img_s": round(fp32_rate, 1),
        "ort_int8_img_s": round(int8_rate, 1),
        "ort_fp16_img_s": round(fp16_rate, 1),
        "fp16_provider": fp16.providers[0],
        "pipeline_img_s": round(pipeline_rate, 1),
        "pipeline_stage_seconds": stats.seconds,
        "ratio_ort_fp32_vs_torch": round(fp32_rate / torch_rate, 2),
        "ratio_int8_vs_fp32": round(int8_rate / fp32_rate, 2),
        "ratio_pipeline_vs_ort_fp32": round(pipeline_rate / fp32_rate, 3),
        "knn_acc_fp32": None,
        "knn_acc_int8": None,
        "knn_acc_head64": None,
        "knn_note": "10-NN majority vote, Fashion-MNIST test (10k) against train (60k), exact cosine",
        "head64_note": None,
        "device": device(),
        "providers": fp32.providers,
        "torch": torch.__version__,
    }
    if not args.skip_knn:
        for name, enc in (("fp32", fp32), ("int8", int8)):
            train = _features(enc, x_train, "fmnist-train", args.batch)
            test = _features(enc, x_test, "fmnist-test", args.batch)
            result[f"knn_acc_{name}"] = round(knn_accuracy(train, y_train, test, y_test), 4)
            print(f"10-NN accuracy {name}: {result[f'knn_acc_{name}']}")
            if name == "fp32":
                result.update(_head64(enc, train, y_train, test, y_test, args.head_epochs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
