"""Typed settings: the only reader of the process environment.

Every setting can be given as an environment variable with the ``CLUSTERLENS_`` prefix
(``CLUSTERLENS_DATA_DIR``, ``CLUSTERLENS_INDEX_NPROBE``, ...) or in a ``.env`` file.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
QUEUE_NAME = r"^[a-z0-9][a-z0-9-]{1,56}[a-z0-9]$"
# The job kinds: here, not in shared.jobs, as a setting names them and shared.jobs imports modules that import this.
JobKind = Literal["embed", "reindex", "train_head", "retrain", "analyse", "ingest_container", "dedupe"]


class Settings(BaseSettings):
    """All clusterlens settings, read once from the environment."""

    model_config = SettingsConfigDict(env_prefix="CLUSTERLENS_", env_file=".env", extra="ignore", populate_by_name=True)

    # Storage
    storage_backend: Literal["local", "azure"] = "local"
    data_dir: Path = Path(".clusterlens")
    azure_storage_connection_string: str | None = None
    azure_storage_account_url: str | None = None
    container_prefix: str = Field(
        default="", pattern=r"^[a-z0-9-]{0,20}$", description="Prefix for container names: 'cl-' gives 'cl-uploads'."
    )

    # Jobs: the queues between the function app and the container jobs (or `clusterlens worker`).
    # The GPU kinds go to one queue, the rest to the other (see shared/queues.py JobQueues).
    queue_name: str = Field(default="jobs", pattern=QUEUE_NAME, description="The CPU queue: every kind not a GPU kind.")
    gpu_queue_name: str = Field(
        default="jobs-gpu",
        pattern=QUEUE_NAME,
        description="The queue of the GPU kinds; the same name as queue_name puts every job on one queue.",
    )
    gpu_job_kinds: list[JobKind] = Field(
        default=["embed", "train_head"], description="Job kinds that go to the GPU queue (JSON list)."
    )
    poison_queue_name: str = Field(default="jobs-poison", pattern=QUEUE_NAME)
    job_max_attempts: int = Field(default=5, ge=1, le=100, description="Tries before a job goes to the poison queue.")
    job_visibility_seconds: int = Field(
        default=120,
        ge=2,
        le=7 * 24 * 3600,
        description="A taken message stays hidden this long; renewed while working.",
    )
    job_retry_seconds: float = Field(default=10, ge=0, description="First retry delay; doubles each try.")
    job_poll_seconds: float = Field(default=1.0, gt=0, le=60, description="Idle worker's wait between queue polls.")
    embed_batch_seconds: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="Uploads arriving within one window share one embedding job, which runs when the window closes.",
    )
    reindex_schedule: str = Field(
        default="0 0 * * * *",
        validation_alias=AliasChoices("REINDEX_SCHEDULE", "CLUSTERLENS_REINDEX_SCHEDULE"),
        description="NCRONTAB (seconds first) of the reindex timer.",
    )
    retrain_schedule: str = Field(
        default="0 30 2 * * *",
        validation_alias=AliasChoices("RETRAIN_SCHEDULE", "CLUSTERLENS_RETRAIN_SCHEDULE"),
        description="NCRONTAB (seconds first) of the retrain timer.",
    )

    # Models
    model_dir: Path = PROJECT_ROOT / "models"
    image_encoder: str = "efficientnet_lite0"
    text_encoder: str = "minilm_l6"
    image_size: int = Field(default=224, ge=32, le=512)
    ort_intra_op_threads: int = Field(default=0, ge=0, description="0 lets ONNX Runtime decide.")
    ort_providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    # Embedding
    embed_batch_size: int = Field(default=64, ge=1, le=4096)
    embed_shard_size: int = Field(default=4096, ge=1)
    embed_unit_size: int = Field(
        default=10_000, ge=1, description="a backfill is split into units of this many images, one job each"
    )
    embed_compact_rows: int = Field(
        default=100_000,
        ge=0,
        description="a full reindex rewrites shards under half this many rows into shards of this many "
        "(when they hold this many between them); 0: never",
    )
    straggler_sweep_seconds: float = Field(
        default=600,
        ge=0,
        description="a reindex looks for images whose embedding job died at most this often (0: every time)",
    )
    embed_decode_workers: int = Field(
        default=0, ge=0, le=256, description="threads decoding and resizing; 0: one per core this process may use"
    )
    embed_io_workers: int = Field(
        default=64, ge=1, le=512, description="storage reads in flight at once while embedding (I/O, not CPU)"
    )

    # Index
    index_kind: Literal["auto", "flat", "ivf_flat", "ivf_pq"] = Field(
        default="auto", description="auto: flat for small sets, IVF-Flat while it fits index_memory_mb, else IVF-PQ."
    )
    index_memory_mb: float = Field(
        default=1024, gt=0, description="Memory budget for the vectors an index holds (codes and ids)."
    )
    index_flat_max: int = Field(default=2000, ge=0, description="auto: exact search up to this many images.")
    index_pq_m: int = Field(default=0, ge=0, description="IVF-PQ sub-quantisers (code bytes); 0 chooses.")
    index_pq_nbits: int = Field(
        default=4, ge=4, le=12, description="IVF-PQ bits per sub-quantiser; 4 scans the codes with SIMD (fast-scan)."
    )
    index_rerank: int = Field(
        default=10, ge=1, le=100, description="IVF-PQ: k times this many candidates are re-ranked exactly."
    )
    index_raw_rerank: int = Field(
        default=5,
        ge=0,
        le=100,
        description="With PCA: k times this many candidates are re-ranked by raw cosine (8-bit raw codes); 0 is off.",
    )
    index_refine_memory_mb: float = Field(
        default=1024,
        ge=0,
        description=(
            "Re-ranking codes (IVF-PQ's, then the raw ones) up to this size are held in memory; larger ones"
            " are read per query."
        ),
    )
    index_pca_dim: int = Field(default=256, ge=0, description="0 turns PCA off.")
    index_power: float = Field(default=0.5, gt=0, le=1, description="Power normalisation; 1 turns it off.")
    index_nlist: int = Field(default=0, ge=0, description="0 chooses from the collection size.")
    index_nprobe: int = Field(default=0, ge=0, description="0 picks the smallest reaching the recall target.")
    index_recall_target: float = Field(default=0.95, gt=0, le=1, description="recall@10 vs exact search.")
    index_recall_sample: int = Field(default=1000, ge=10)
    index_retrain_fraction: float = Field(
        default=0.2, ge=0, description="Add to the existing clusters until the collection grows by this share."
    )
    index_keep_versions: int = Field(default=3, ge=1, description="Published versions kept for rollback.")
    index_min_points_per_list: int = Field(default=39, ge=1)
    index_space: Literal["backbone", "head"] = Field(
        default="backbone", description="Index the 1280-d backbone embeddings or the trained 64-d head's."
    )
    index_refresh_seconds: float = Field(default=5.0, ge=0)
    index_mount: Path | None = Field(
        default=None,
        description="A folder holding published index versions as <version>/<file> (in Azure the function app's "
        "mount of the index share, /mounts/index): a version found there with its blobs' sizes is opened in "
        "place, not downloaded; unset: versions are downloaded to data_dir/cache/index.",
    )
    index_share_dir: Path | None = Field(
        default=None,
        description="Where the publisher copies each new index version before it swaps the pointer (in Azure the "
        "jobs' read-write mount of the index share, /mounts/index); pruned versions go from it too; unset: no copy.",
    )
    search_threads: int = Field(
        default=1,
        ge=0,
        description="FAISS threads in the API process (0: FAISS's default, every core). A single query gains "
        "nothing from more, and idle OpenMP threads spinning beside ONNX Runtime's slow both down.",
    )

    # Text search
    text_temperature: float = Field(default=0.05, gt=0, le=1, description="Softmax temperature over class texts.")
    max_text_chars: int = Field(default=500, ge=1)
    text_min_score: float = Field(default=0.001, ge=0, le=1, description="Text results below this are dropped.")

    # Labels, the classifier and active learning
    label_classes: list[str] = Field(
        default=[], description="The class list; empty: created from the first labels (at ingest, first batch)."
    )
    classifier_kind: Literal["lightgbm", "logistic", "knn"] = "lightgbm"
    classifier_space: Literal["backbone", "head"] = Field(
        default="backbone", description="Train on backbone embeddings (PCA-reduced) or the projection head's."
    )
    classifier_pca_dim: int = Field(default=128, ge=0, description="Backbone features for the classifier; 0: all.")
    classifier_holdout: float = Field(default=0.2, ge=0, lt=1, description="Labelled share held out to measure it.")
    classifier_keep_versions: int = Field(default=5, ge=1)
    al_strategy: Literal["random", "least_confidence", "margin", "entropy"] = Field(
        default="margin", description="Default order of the labelling queue."
    )
    al_pool_factor: float = Field(
        default=3.0, ge=1, le=100, description="Diversity: cluster this many times the picks' most uncertain images."
    )
    al_class_balance: float = Field(
        default=0, ge=0, le=1, description="Cap on one predicted class's share of the queue; 0: off."
    )
    al_relabel_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of each labelling batch given to re-label requests for the latest report's likely "
        "mislabels (most suspect first); 0: new images only.",
    )
    label_queue_size: int = Field(default=500, ge=1, le=100_000, description="Queue length computed per retrain.")
    max_label_batch: int = Field(default=500, ge=1, le=10_000, description="Labels per POST /api/labels.")
    retrain_after_labels: int = Field(
        default=50, ge=0, description="Queue a retrain once this many labels arrived since the last one; 0: off."
    )

    pass_sample: int = Field(
        default=50_000,
        ge=100,
        description="Retrain and analysis read the shards in bounded memory and fit their feature space, "
        "k-means and Isolation Forest on a seeded sample of at most this many images (maps may draw more).",
    )

    # Batch analysis (clusters, maps, classifiers, anomalies): `clusterlens analyse`, job kind analyse
    analysis_k: int = Field(default=0, ge=0, le=4096, description="k-means clusters; 0: silhouette sweep.")
    analysis_k_min: int = Field(default=4, ge=2, description="Silhouette sweep: smallest k tried.")
    analysis_k_max: int = Field(default=30, ge=2, le=4096, description="Silhouette sweep: largest k tried.")
    analysis_silhouette_sample: int = Field(default=5000, ge=100, description="Images the silhouette is scored on.")
    analysis_maps: list[Literal["pca", "umap", "tsne"]] = Field(default=["pca", "umap", "tsne"])
    analysis_map_sample: int = Field(default=10_000, ge=100, description="UMAP and t-SNE draw at most this many.")
    analysis_pca_points: int = Field(default=100_000, ge=100, description="The PCA map draws at most this many.")
    analysis_anomaly_share: float = Field(default=0.05, gt=0, lt=1, description="Most isolated share flagged.")
    analysis_mislabel_vote: float = Field(
        default=0.7, gt=0.5, le=1, description="Flag a label when this share of its 10 neighbours says otherwise."
    )
    analysis_label_issues: Literal["confident_learning", "knn_vote"] = Field(
        default="confident_learning",
        description="How likely mislabels are found: cleanlab's confident learning over cross-validated "
        "probabilities, or the 10 nearest labelled neighbours' vote (analysis_mislabel_vote).",
    )
    analysis_label_issue_model: Literal["logistic+knn", "logistic", "lightgbm"] = Field(
        default="logistic+knn",
        description="Where confident learning's out-of-sample probabilities come from: a cross-validated "
        "classifier, or the mean of logistic regression's and the 20 nearest labelled neighbours' weighted vote.",
    )
    analysis_contact_per_cluster: int = Field(default=8, ge=1, le=32)
    analysis_keep_versions: int = Field(default=5, ge=1)

    # Near-duplicates: `clusterlens dedupe`, job kind dedupe (job/duplicates.py)
    dedupe_precision: float = Field(
        default=0.98, gt=0.5, lt=1, description="Precision the calibrated near-duplicate threshold is chosen for."
    )
    dedupe_calibration_images: int = Field(
        default=200, ge=10, le=20_000, description="Images copied (5 transforms each) to calibrate the threshold."
    )
    dedupe_flip: bool = Field(default=False, description="A mirrored copy of an image counts as its duplicate.")

    # Access: read endpoints are open unless a read key is set; write/admin endpoints are closed
    # until a write key is set (or the platform's sign-in is trusted). See shared/access.py.
    api_key: SecretStr | None = Field(
        default=None, description="Write/admin key (X-API-Key header); unset: write endpoints are closed."
    )
    read_key: SecretStr | None = Field(default=None, description="Read key; unset: read endpoints are open.")
    auth_platform: bool = Field(
        default=False,
        description="Trust App Service authentication (Entra ID): its principal header's app roles grant access. "
        "Only with the platform's authentication on (it strips the header from incoming requests).",
    )
    cors_origins: list[str] = Field(
        default=[], description="Origins allowed to call the API from a browser (CORS); empty: CORS off."
    )

    # Limits
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=50_000_000, ge=1)
    max_k: int = Field(default=100, ge=1)
    default_k: int = Field(default=10, ge=1)

    # Datasets
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")

    @field_validator("reindex_schedule", "retrain_schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        from croniter import croniter

        if len(value.split()) != 6 or not croniter.is_valid(value, second_at_beginning=True):
            raise ValueError(f"{value!r} is not an NCRONTAB schedule (six fields, seconds first: '0 0 * * * *')")
        return value

    @field_validator("api_key", "read_key", mode="before")
    @classmethod
    def _check_key(cls, value: object) -> object:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or raw == "":
            return None
        if not isinstance(raw, str) or not 16 <= len(raw) <= 256 or not raw.isascii() or not raw.isprintable():
            raise ValueError("an access key is 16 to 256 printable ASCII characters")
        return raw

    @field_validator("index_mount", "index_share_dir", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.api_key and self.read_key and self.api_key == self.read_key:
            raise ValueError("the read key must differ from the write key")
        if self.default_k > self.max_k:
            raise ValueError("default_k must not exceed max_k")
        if self.poison_queue_name in (self.queue_name, self.gpu_queue_name):
            raise ValueError("the poison queue must differ from the job queues")
        if self.analysis_k_min > self.analysis_k_max:
            raise ValueError("analysis_k_min must not exceed analysis_k_max")
        if self.storage_backend == "azure" and not (
            self.azure_storage_connection_string or self.azure_storage_account_url
        ):
            raise ValueError(
                "storage_backend=azure needs CLUSTERLENS_AZURE_STORAGE_CONNECTION_STRING "
                "or CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL"
            )
        return self

    @property
    def encoder_dir(self) -> Path:
        """Folder holding the image encoder's ONNX file and manifest."""
        return self.model_dir / self.image_encoder

    @property
    def text_encoder_dir(self) -> Path:
        """Folder holding the text encoder's ONNX file, tokenizer and manifest."""
        return self.model_dir / self.text_encoder


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
