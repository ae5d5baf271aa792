"""Typed manifests: what every model file and every published version says about itself.

One pydantic model per kind of artefact, read where it is loaded and written where it is built, so
a field is named once and a malformed manifest fails on load with a clear error:

- :class:`EncoderManifest`: an exported image encoder (``models/<name>/manifest.json``).
- :class:`TextEncoderManifest`: the exported text encoder.
- :class:`HeadManifest`: a trained projection head (``models/heads/vNNNNNN/manifest.json``).
- :class:`IndexManifest`: a published index version (``index/vNNNNNN/manifest.json``).
- :class:`ClassifierManifest`: a trained label classifier: the retrain's published version
  (``models/classifiers/vNNNNNN/manifest.json``) and the analysis report's best model.
- :class:`ReportManifest`: a published analysis report (``reports/vNNNNNN/manifest.json``).

Descriptive extras a writer adds (export timings, training history, sources) are kept as they are
(``extra="allow"``), so reading and writing a manifest back loses nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.errors import NotReady


class Manifest(BaseModel):
    """Base of every manifest: extra fields kept, JSON in and out."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    @classmethod
    def parse(cls, value: dict[str, Any], where: str = "") -> Self:
        """Validate a manifest read from ``where``.

        Raises:
            NotReady: the manifest does not have the fields its kind needs (``manifest_invalid``).
        """
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise NotReady(
                f"{where or cls.__name__} is not a valid {cls.__name__}: {field}: {first['msg']}",
                code="manifest_invalid",
            ) from None

    @classmethod
    def read(cls, path: Path) -> Self:
        """A manifest file.

        Raises:
            NotReady: missing (``model_missing``) or invalid (``manifest_invalid``).
        """
        if not path.is_file():
            raise NotReady(f"no manifest at {path}; run `make models` first", code="model_missing")
        return cls.parse(json.loads(path.read_text(encoding="utf-8")), str(path))

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (extras included, unset optional fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


class Part(BaseModel):
    """A nested block of a manifest (extra fields kept)."""

    model_config = ConfigDict(extra="allow")


# -- models ----------------------------------------------------------------------------------------


class EncoderInput(Part):
    name: str
    layout: str = "NCHW"
    size: int
    dynamic_size: bool = False


class Normalisation(Part):
    mean: float
    std: float


class EncoderManifest(Manifest):
    """An exported image encoder: ``(x - mean) / std`` RGB input, ``embedding`` and ``logits`` outputs."""

    name: str
    version: str
    file: str
    sha256: str
    bytes: int | None = None  # the file's size, checked at start instead of its hash (shared/sessions.py)
    opset: int
    input: EncoderInput
    normalisation: Normalisation
    outputs: dict[str, int]


class TokenizerFile(Part):
    file: str
    max_tokens: int


class ClassTexts(Part):
    file: str
    sha256: str


class TextEncoderManifest(Manifest):
    """The exported text encoder: tokenizer, ONNX graph (pooling and L2 inside), ImageNet class texts."""

    name: str
    version: str
    file: str
    sha256: str
    bytes: int | None = None  # the file's size, checked at start instead of its hash (shared/sessions.py)
    opset: int
    tokenizer: TokenizerFile
    outputs: dict[str, int]
    imagenet_classes: ClassTexts | None = None  # written by the export once the model can embed them


class HeadManifest(Manifest):
    """A trained projection head (``job/train_head.py``): raw backbone embedding in, ``dim`` out."""

    version: str | None = None
    file: str = "head.onnx"
    sha256: str
    input_dim: int
    dim: int
    classes: list[str]
    encoder_version: str
    power: float = 0.5
    dropped_classes: list[str] = []
    train: dict[str, Any] = {}


# -- index -----------------------------------------------------------------------------------------


class RecallReport(Part):
    """The recall gate's measurement: recall@10 against exact search at the chosen setting."""

    target: float
    at_10: float
    meets_target: bool = True
    sample: int = 0
    curve: list[dict[str, Any]] = []
    seconds: float | None = None
    # the setting chosen (absent from reports written before the gate bisected)
    nprobe: int | None = None
    rerank: int | None = None
    raw_rerank: int | None = None
    # what the exact neighbours were found in: "raw" (the power- and L2-normalised embeddings, for an
    # index that re-ranks in the raw space) or "index" (the index's own space)
    space: str = "index"


class IndexManifest(Manifest):
    """A built index: what it was built from, its parameters, its recall and timings."""

    version: str | None = None
    format: int = 0
    encoder_version: str
    space: str = "backbone"
    head: dict[str, Any] | None = None
    factory: str
    kind: str = "ivf_flat"
    plan: dict[str, Any] = {}
    rerank: int = 0
    # with PCA: k times this many candidates are re-ranked by raw cosine (raw.npy); 0: none
    raw_rerank: int = 0
    bytes_per_vector: int | None = None
    count: int
    input_dim: int
    dim: int
    pca_dim: int = 0
    nlist: int
    nprobe: int = 0
    metric: str = "cosine"
    power: float = 1.0
    label_names: list[str] = []
    captions: int = 0
    cluster_sizes: dict[str, int] = {}
    trained_count: int | None = None
    built_at: str
    train_seconds: float = 0.0
    train: dict[str, Any] = {}
    build_seconds: float = 0.0
    source: dict[str, Any] = {}
    recall: RecallReport | None = None
    incremental: dict[str, Any] | None = None
    published: bool | None = None
    # the folders whose rows make up this version, base first: {"version", "rows", "label_names"} each;
    # empty for a version that holds all its rows itself (every full build)
    segments: list[dict[str, Any]] = []

    @property
    def fingerprint(self) -> str | None:
        """What the build read (see :func:`job.index_build.fingerprint`), if recorded."""
        value = self.source.get("fingerprint")
        return str(value) if value is not None else None

    @property
    def shard_names(self) -> set[str]:
        return set(self.source.get("shard_names", []))

    def summary(self) -> dict[str, Any]:
        """The headline of a version, as the index listing shows it."""
        keep = ("count", "kind", "nlist", "nprobe", "space", "built_at", "encoder_version")
        return {k: v for k, v in self.to_json().items() if k in keep}


# -- classifiers and reports -----------------------------------------------------------------------


class ClassifierManifest(Manifest):
    """A trained label classifier, served by :class:`shared.classifier.ClassifierModel`.

    The retrain job publishes one per version (with predictions and labelling queues beside it);
    the analysis report carries its best model as one (``kind`` ``knn10`` has no model file: it votes
    over the live index's labelled images).

    Attributes:
        kind: ``lightgbm``, ``logistic``, ``knn`` or ``knn10``.
        classes: class names, in the model's output order.
        encoder_version, head_version: the embedding space the features come from.
        feature_dim: the model's input dimension (the feature transform's output).
        power: power normalisation of the feature transform.
        model_file: the ONNX model beside the manifest, None for ``knn10``.
        accuracy: held-out accuracy (None when too few labels to hold some out).
        labelled: labels the served model was fitted on.
        metrics: the held-out evaluation (see :func:`job.classifier.evaluate`).
    """

    version: str | None = None
    kind: str
    classes: list[str]
    encoder_version: str
    head_version: str | None = None
    feature_dim: int
    power: float = 0.5
    model_file: str | None = None
    features_file: str = "features.npz"
    accuracy: float | None = None
    labelled: int = 0
    metrics: dict[str, Any] = {}
    knn_k: int = 10
    knn_alpha: float = 0.5


class RetrainManifest(ClassifierManifest):
    """The retrain's published version: the classifier plus what it was trained from."""

    space: str = "backbone"
    label_set: int | None = None
    labels_used: int = 0
    label_counts: dict[str, int] = {}
    log_entries: int = 0
    left_out: dict[str, int] = {}
    images: int = 0
    trained_at: str
    default_strategy: str | None = None


class ReportManifest(Manifest):
    """A published analysis report: its files (the only ones served) and each step's status."""

    version: str
    created_at: str
    files: list[str]
    steps: dict[str, dict[str, Any]] = {}
