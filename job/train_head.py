"""Train the projection head on backbone embeddings of labelled images and export it to ONNX.

Torch is imported here, on the job side only; the query path runs the export with onnxruntime
(:mod:`shared.head`). The network is the original pipeline's design::

    features (1280) -> power norm + L2 -> BN -> Dropout(0.5) -> Linear 512 -> ReLU -> BN -> Dropout(0.3)
                    -> Linear 64 (the embedding) -> Linear n_classes (logits)

trained with AdamW, a one-cycle learning rate and label smoothing, with mixed precision
(fp16 autocast + gradient scaling) when CUDA is present. A random share of the labelled images is
held out: the manifest records held-out classification and 10-NN accuracy in the 64-d space.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shared.errors import BadRequest, NotReady
from shared.head import HEAD_FILE, HEADS
from shared.manifests import HeadManifest
from shared.sessions import file_sha256
from shared.settings import Settings
from shared.storage import MODELS, Storage
from shared.versions import claim_next, prune, swap_pointer

log = logging.getLogger(__name__)

NAME = "projection_head"
OPSET = 17
MIN_LABELLED = 20
MIN_PER_CLASS = 2


class HeadNet(nn.Module):
    """The projection head; ``forward`` returns (64-d embedding before L2, class logits)."""

    def __init__(self, input_dim: int, n_classes: int, *, hidden: int = 512, dim: int = 64, power: float = 0.5):
        super().__init__()
        self.power = power
        self.body = nn.Sequential(
            nn.BatchNorm1d(input_dim),
            nn.Dropout(0.5),
            nn.Linear(input_dim, hidden),
            nn.ReLU(),
            nn.BatchNorm1d(hidden),
            nn.Dropout(0.3),
            nn.Linear(hidden, dim),
        )
        self.classifier = nn.Linear(dim, n_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The index's normalisation of raw backbone embeddings: signed power, then L2."""
        if self.power != 1.0:
            x = torch.sign(x) * torch.abs(x).pow(self.power)
        return F.normalize(x, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.body(self.prepare(x))
        return z, self.classifier(z)


class _Exported(nn.Module):
    """What the ONNX file computes: L2-normalised embedding and softmax probabilities."""

    def __init__(self, net: HeadNet):
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, logits = self.net(features)
        return F.normalize(z, dim=1), torch.softmax(logits, dim=1)


@dataclass
class TrainedHead:
    """A trained and exported head: ``onnx_path`` and the ``manifest`` to publish with it."""

    onnx_path: Path
    manifest: HeadManifest
    net: HeadNet
    rows_held_max: int = 0  # the most embedding rows held at once while reading them (train_on_collection)


def pick_device(device: str = "auto") -> str:
    """``cuda`` when asked for or available (``auto``), else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def train_head(
    features: np.ndarray,
    labels: Sequence[str],
    out_dir: Path,
    *,
    encoder_version: str,
    power: float = 0.5,
    hidden: int = 512,
    dim: int = 64,
    epochs: int = 15,
    batch_size: int = 256,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> TrainedHead:
    """Train a head on (n, input_dim) backbone embeddings with n label names, export it to ``out_dir``.

    Raises:
        BadRequest: fewer than 20 labelled images or fewer than two classes.
    """
    from tqdm import tqdm

    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and {len(labels)} labels must agree")
    counts = Counter(labels)
    dropped = sorted(c for c, n in counts.items() if n < MIN_PER_CLASS)  # one example teaches nothing
    if dropped:
        keep = [i for i, label in enumerate(labels) if counts[label] >= MIN_PER_CLASS]
        features, labels = features[keep], [labels[i] for i in keep]
    classes = sorted(set(labels))
    if len(labels) < MIN_LABELLED or len(classes) < 2:
        raise BadRequest(
            f"training a head needs at least {MIN_LABELLED} labelled images in at least 2 classes; "
            f"found {len(labels)} in {len(classes)}",
            code="not_enough_labels",
        )
    device = pick_device(device)
    amp = device == "cuda"
    torch.manual_seed(seed)
    code = {c: i for i, c in enumerate(classes)}
    y_all = torch.tensor([code[c] for c in labels], dtype=torch.long)
    x_all = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n_val = int(round(len(labels) * val_fraction)) if val_fraction > 0 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_tr, y_tr = x_all[train_idx].to(device), y_all[train_idx].to(device)
    x_val, y_val = x_all[val_idx].to(device), y_all[val_idx].to(device)

    net = HeadNet(features.shape[1], len(classes), hidden=hidden, dim=dim, power=power).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    # Small label sets: smaller batches, so an epoch is at least ~16 optimiser steps.
    batch_size = max(2, min(batch_size, max(16, len(train_idx) // 16), len(train_idx)))
    steps_per_epoch = len(train_idx) // batch_size  # drop the ragged last batch: BatchNorm needs > 1 row
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"train head ({device}{', amp' if amp else ''})", unit="epoch", disable=not progress)
    for epoch in bar:
        net.train()
        order = torch.randperm(len(train_idx), device=device)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            with torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
                _, logits = net(x_tr[idx])
                loss = F.cross_entropy(logits, y_tr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += float(loss.detach())
        row = {"epoch": epoch + 1, "loss": round(total / max(steps_per_epoch, 1), 4)}
        if n_val:
            row["val_accuracy"] = round(_accuracy(net, x_val, y_val), 4)
        history.append(row)
        bar.set_postfix(row)
    seconds = time.perf_counter() - t0

    net = net.cpu().eval()
    metrics: dict[str, Any] = {"val_accuracy": history[-1].get("val_accuracy"), "val_knn10_accuracy": None}
    if n_val:
        metrics["val_knn10_accuracy"] = round(
            _knn_accuracy(net, x_all[train_idx], y_all[train_idx], x_all[val_idx], y_all[val_idx]), 4
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "head.onnx"
    _export(net, features.shape[1], onnx_path)
    manifest = {
        "name": NAME,
        "file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "opset": OPSET,
        "input": "features: float32 (n, input_dim) raw backbone embeddings",
        "outputs": {"embedding": dim, "probs": len(classes)},
        "input_dim": int(features.shape[1]),
        "dim": dim,
        "hidden": hidden,
        "power": power,
        "classes": classes,
        "dropped_classes": dropped,
        "encoder_version": encoder_version,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "train": {
            "labelled": len(labels),
            "train": len(train_idx),
            "held_out": n_val,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": seed,
            "device": device,
            "mixed_precision": amp,
            "seconds": round(seconds, 2),
            "torch": torch.__version__,
            **metrics,
            "history": history,
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("trained head in %.1f s: %s", seconds, metrics)
    return TrainedHead(onnx_path, HeadManifest.parse(manifest, str(out_dir)), net)


@torch.no_grad()
def _accuracy(net: HeadNet, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    _, logits = net(x)
    return float((logits.argmax(1) == y).float().mean())


@torch.no_grad()
def _knn_accuracy(net: HeadNet, x_tr: torch.Tensor, y_tr: torch.Tensor, x_q: torch.Tensor, y_q: torch.Tensor) -> float:
    """10-NN majority vote of held-out rows against the training rows, cosine in the head's space."""
    import faiss

    net.eval()
    train = F.normalize(net(x_tr)[0], dim=1).numpy()
    query = F.normalize(net(x_q)[0], dim=1).numpy()
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    _, rows = index.search(query, min(10, len(train)))
    votes = y_tr.numpy()[rows]
    n_classes = int(y_tr.max()) + 1
    pred = np.array([np.bincount(v, minlength=n_classes).argmax() for v in votes])
    return float((pred == y_q.numpy()).mean())


def _export(net: HeadNet, input_dim: int, path: Path) -> None:
    tmp = path.with_suffix(".onnx.tmp")
    wrapper = _Exported(net).eval()  # the exporter restores the wrapper's mode afterwards: make it eval
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (torch.zeros(2, input_dim),),
            str(tmp),
            input_names=["features"],
            output_names=["embedding", "probs"],
            dynamic_axes={"features": {0: "batch"}, "embedding": {0: "batch"}, "probs": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    tmp.replace(path)
    net.eval()


def train_on_collection(
    storage: Storage, settings: Settings, encoder_version: str, **options: Any
) -> tuple[TrainedHead, str]:
    """Train on the stored embeddings of every labelled image in the collection and publish the head.

    The labels are those given at ingest (the shards' ``label`` column). The shards are read one at a
    time (:func:`job.passes.collect`), keeping only the labelled rows, so memory grows with the labels,
    not with the collection.

    Args:
        options: passed to :func:`train_head` (epochs, batch_size, lr, seed, device, progress, ...).

    Returns:
        the trained head and its published version.

    Raises:
        NotReady: if nothing has been embedded with this encoder.
        BadRequest: if too few images are labelled.
    """
    import tempfile

    from job.embeddings import EmbeddingStore
    from job.passes import collect
    from shared.catalog import Catalog

    store = EmbeddingStore(storage, encoder_version)
    if not store.shards():
        raise NotReady(
            f"no embeddings for encoder {encoder_version}: run `clusterlens embed` first", code="no_embeddings"
        )
    # One read of every shard, keeping only the rows labelled at ingest (no sample: nothing else is fitted).
    seen = collect(store, sample_size=0, catalog=Catalog(storage))
    with tempfile.TemporaryDirectory(prefix="clusterlens-head-") as tmp:
        trained = train_head(
            seen.labelled_vectors,
            seen.labels,
            Path(tmp),
            encoder_version=encoder_version,
            power=settings.index_power,
            **options,
        )
        trained.rows_held_max = seen.rows_held_max
        version = publish_head(storage, trained.onnx_path, trained.manifest)
    trained.manifest = trained.manifest.model_copy(update={"version": version})
    return trained, version


def publish_head(storage: Storage, onnx_path: Path, manifest: HeadManifest, keep: int = 5) -> str:
    """Store a trained head as a new version and point ``CURRENT`` at it.

    Returns:
        the version name (``v000003``).
    """
    version = claim_next(storage, MODELS, HEADS)
    storage.upload_file(MODELS, f"{HEADS}{version}/{HEAD_FILE}", Path(onnx_path))
    storage.put_json(
        MODELS, f"{HEADS}{version}/manifest.json", manifest.model_copy(update={"version": version}).to_json()
    )
    swap_pointer(storage, MODELS, version, HEADS)
    prune(storage, MODELS, keep, version, HEADS)
    log.info("published projection head %s", version)
    return version
