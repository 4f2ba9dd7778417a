"""``resnet50`` — transformers' ResNet-50 with seeded random weights: a realistic 224x224 workload.

Its accuracy figures are not meaningful (random weights, synthetic data); it exists to measure
speed and size of each precision.
"""

from __future__ import annotations

from pathlib import Path

from builder.sources.base import LoadedModel, SourceCapabilities
from builder.sources.common import synthetic_dataset
from builder.sources.torch_module import TorchModelSpec, load_torch_spec
from common.model_repository import TensorSpec

CALIBRATION_SAMPLES = 32
EVALUATION_SAMPLES = 32
NOT_MEANINGFUL = (
    "resnet50 has random weights (seeded) and synthetic inputs: its accuracy and agreement "
    "figures are not meaningful; it is built to compare speed and size"
)


def build_module() -> object:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(num_labels=1000)).eval()

    class LogitsOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values).logits

    return LogitsOnly().eval()


class ResNet50Source:
    capabilities = SourceCapabilities()

    def load(self, reference: str, workdir: Path) -> LoadedModel:
        inputs = [TensorSpec("pixel_values", "float32", [3, 224, 224])]
        spec = TorchModelSpec(
            module=build_module(),
            inputs=inputs,
            output_names=["logits"],
            calibration=synthetic_dataset(
                inputs, CALIBRATION_SAMPLES, seed=0, description="synthetic images"
            ),
            evaluation=synthetic_dataset(
                inputs, EVALUATION_SAMPLES, seed=1, description="synthetic images"
            ),
            task="classification",
            max_batch_size=32,
            accuracy_meaningful=False,
            default_precisions=["fp32", "fp16", "bf16", "int8"],
            notes=[NOT_MEANINGFUL],
        )
        return load_torch_spec(spec, Path(workdir), "resnet50", "resnet50")
