"""Quantization-aware training (QAT): fine-tune a source's PyTorch module with the INT8
quantizer it will be deployed with emulated, then export the trained FP32 weights to ONNX for
that same quantizer (ONNX Runtime's static QDQ or dynamic INT8) to quantize.

The fake quantization is ``torch.ao.quantization``'s ``FakeQuantize`` with its observers (no
observer of our own), placed where ONNX Runtime quantizes:

- weights of every ``Linear`` / ``Conv`` (the MatMul/Gemm/Conv weights): per-channel over the
  output channel, symmetric S8 in [-127, 127] (ONNX Runtime's symmetric weights; 7-bit where
  the host needs ``reduce_range``), the range of the current weights at each step;
- their input activations: static - per-tensor affine with the min/max seen over the training
  rows (ONNX Runtime's minmax calibration; U8 on x86, S8 elsewhere); dynamic - per-tensor U8
  affine with the range of each batch, as ``DynamicQuantizeLinear`` computes it at run time;
- ``Embedding`` weights (the Gather ONNX Runtime quantizes): per-tensor.

The objective: cross-entropy with the labels when the training rows have them (classifiers),
otherwise distillation to the FP32 module's outputs (1 - cosine for embeddings, KL divergence
of the softmax for logits). The module stays in eval mode (dropout off, batch-norm statistics
frozen); gradients pass the rounding straight through. The trained module is exported without
fake quantization (the quantizer re-derives the same weight grid from the trained weights).

Trained exports are cached under ``$PRECISION_SERVE_CACHE/qat/<model>/`` keyed by a hash of the
source's FP32 file, the training rows and the settings: an unchanged build reuses them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from builder.cache import cache_root
from builder.errors import QuantizationError
from builder.sources.base import Dataset, LoadedModel

log = logging.getLogger(__name__)

LIBRARY = "torch.ao.quantization FakeQuantize"
QAT_MODES = ("static", "dynamic")
DEFAULT_LR = {True: 5e-5, False: 1e-4}  # transformer -> lr
RECIPE = "qat-v1"  # bump when the training changes what it produces (part of the cache key)
LOSS_WINDOW = 10  # steps averaged for the loss reported at the start and the end


@dataclass
class Quantizer:
    """The deployed quantizer the training emulates."""

    mode: str  # "static" | "dynamic"
    activation: str = "QUInt8"  # static only; dynamic activations are always U8
    reduce_range: bool = False  # 7-bit weights (x86 without VNNI, static only)


@dataclass
class TrainingSettings:
    steps: int
    batch_size: int
    lr: float
    max_seconds: float
    seed: int = 0


@dataclass
class TrainingRecord:
    """What the manifest records about one training (``details["qat"]``)."""

    mode: str
    objective: str
    data: str
    rows: int
    steps: int
    batch_size: int
    lr: float
    seconds: float
    train_loss_start: float
    train_loss_end: float
    stopped_at_time_bound: bool
    library: str = LIBRARY
    cache_hit: bool = False
    cache_file: str = ""
    notes: list[str] = field(default_factory=list)


def objective_for(model: LoadedModel, data: Dataset) -> str:
    if model.task == "classification" and data.labels is not None:
        return "labels (cross-entropy) + distillation to the FP32 logits (KL divergence)"
    if model.task == "classification":
        return "distillation to the FP32 logits (KL divergence)"
    return "distillation to the FP32 outputs (1 - cosine)"


def cache_key(
    model: LoadedModel, data: Dataset, quantizer: Quantizer, settings: TrainingSettings
) -> str:
    import torch

    h = hashlib.sha256()
    with open(model.fp32_onnx, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    for name in sorted(data.inputs):
        arr = np.ascontiguousarray(data.inputs[name])
        h.update(f"{name}{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    if data.labels is not None:
        h.update(np.ascontiguousarray(data.labels).tobytes())
    meta = {
        "quantizer": asdict(quantizer),
        "settings": asdict(settings),
        "torch": torch.__version__,
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:24]


def qat_cache_dir(model: str) -> Path:
    return cache_root() / "qat" / model


# ---- fake quantization -----------------------------------------------------------------------


def _weight_fq(reduce_range: bool, per_channel: bool) -> Any:
    import torch
    from torch.ao.quantization import FakeQuantize
    from torch.ao.quantization.observer import (
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )

    bound = 64 if reduce_range else 127
    if per_channel:
        return FakeQuantize(
            observer=MovingAveragePerChannelMinMaxObserver,
            averaging_constant=1.0,  # the current weights' range
            quant_min=-bound,
            quant_max=bound,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        averaging_constant=1.0,
        quant_min=-bound,
        quant_max=bound,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
    )


def _activation_fq(quantizer: Quantizer) -> Any:
    import torch
    from torch.ao.quantization import FakeQuantize
    from torch.ao.quantization.observer import MinMaxObserver, MovingAverageMinMaxObserver

    if quantizer.mode == "dynamic":  # the range of each batch, as DynamicQuantizeLinear
        return FakeQuantize(
            observer=MovingAverageMinMaxObserver,
            averaging_constant=1.0,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        )
    unsigned = quantizer.activation == "QUInt8"
    return FakeQuantize(  # the range over every row seen, as minmax calibration
        observer=MinMaxObserver,
        quant_min=0 if unsigned else -128,
        quant_max=255 if unsigned else 127,
        dtype=torch.quint8 if unsigned else torch.qint8,
        qscheme=torch.per_tensor_affine,
    )


class _Parametrized:
    """A FakeQuantize as a weight parametrization (``torch.nn.utils.parametrize``)."""

    @staticmethod
    def make(fq: Any) -> Any:
        import torch

        class WeightFakeQuant(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fq = fq

            def forward(self, w: torch.Tensor) -> torch.Tensor:
                return self.fq(w)

        return WeightFakeQuant()


def attach_fake_quant(module: Any, quantizer: Quantizer) -> list[Any]:
    """Fake-quantize ``module`` in place (weights and the inputs of its Linear/Conv layers);
    returns the hook handles (``detach_fake_quant`` undoes everything)."""
    import torch
    from torch.nn.utils import parametrize

    handles = []
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for m in list(module.modules()):
        if isinstance(m, layers):
            fq = _weight_fq(quantizer.reduce_range and quantizer.mode == "static", True)
            parametrize.register_parametrization(m, "weight", _Parametrized.make(fq))
            m.add_module("input_fake_quant", _activation_fq(quantizer))

            def pre_hook(mod: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (mod.input_fake_quant(args[0]), *args[1:])

            handles.append(m.register_forward_pre_hook(pre_hook))
        elif isinstance(m, torch.nn.Embedding):
            parametrize.register_parametrization(
                m, "weight", _Parametrized.make(_weight_fq(False, False))
            )
    return handles


def detach_fake_quant(module: Any, handles: list[Any]) -> None:
    """Remove the fake quantization, keeping the trained FP32 weights."""
    from torch.nn.utils import parametrize

    for h in handles:
        h.remove()
    for m in list(module.modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        if "input_fake_quant" in m._modules:
            del m._modules["input_fake_quant"]


# ---- training --------------------------------------------------------------------------------


def _batch_tensors(data: Dataset, names: list[str], idx: np.ndarray) -> list[Any]:
    """The rows ``idx`` as tensors; [batch, sequence] inputs trimmed to the longest
    attention mask in the batch (padding beyond it changes nothing a mask-aware model says)."""
    import torch

    arrays = [data.inputs[n][idx] for n in names]
    if "attention_mask" in names:
        mask = arrays[names.index("attention_mask")]
        if mask.ndim == 2:
            longest = max(int(mask.sum(axis=1).max()), 1)
            arrays = [
                a[:, :longest] if a.ndim == 2 and a.shape[1] == mask.shape[1] else a for a in arrays
            ]
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) else out


def _loss_fn(objective: str) -> Any:
    import torch.nn.functional as F

    def kl(student: Any, teacher: Any) -> Any:
        return F.kl_div(
            F.log_softmax(student, dim=-1),
            F.log_softmax(teacher, dim=-1),
            log_target=True,
            reduction="batchmean",
        )

    if objective.startswith("labels"):
        return lambda student, teacher, labels: (
            F.cross_entropy(student, labels) + kl(student, teacher)
        )
    if "KL" in objective:
        return lambda student, teacher, labels: kl(student, teacher)
    return lambda student, teacher, labels: (
        1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)
    ).mean()


def train(
    model: LoadedModel,
    data: Dataset,
    quantizer: Quantizer,
    settings: TrainingSettings,
    progress: bool = True,
) -> tuple[Any, TrainingRecord]:
    """Fine-tune a copy of the source's module with ``quantizer`` emulated; returns the trained
    module (fake quantization removed) and what happened."""
    import torch
    from tqdm.auto import tqdm

    if model.trainable is None:
        raise QuantizationError(f"{model.source} has no trainable module")
    names = model.trainable.input_names
    objective = objective_for(model, data)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    teacher = copy.deepcopy(model.trainable.module).eval()
    student = copy.deepcopy(model.trainable.module).eval()  # eval: no dropout, BN frozen
    handles = attach_fake_quant(student, quantizer)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1.0 - s / settings.steps)
    )
    loss_fn = _loss_fn(objective)
    labels = None if data.labels is None else torch.from_numpy(np.asarray(data.labels))
    losses: list[float] = []
    started = time.monotonic()
    stopped = False
    n = len(data)
    bar = tqdm(range(settings.steps), desc=f"QAT ({quantizer.mode} INT8)", disable=not progress)
    try:
        for _ in bar:
            idx = rng.choice(n, size=min(settings.batch_size, n), replace=False)
            xs = _batch_tensors(data, names, idx)
            with torch.no_grad():
                target = _first(teacher(*xs))
            out = _first(student(*xs))
            loss = loss_fn(out, target, None if labels is None else labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if time.monotonic() - started > settings.max_seconds:
                stopped = True
                log.warning("QAT stopped at its %.0f s bound", settings.max_seconds)
                break
    finally:
        bar.close()
        detach_fake_quant(student, handles)
    record = TrainingRecord(
        mode=quantizer.mode,
        objective=objective,
        data=data.description or f"{n} calibration rows",
        rows=n,
        steps=len(losses),
        batch_size=settings.batch_size,
        lr=settings.lr,
        seconds=round(time.monotonic() - started, 1),
        train_loss_start=float(np.mean(losses[:LOSS_WINDOW])),
        train_loss_end=float(np.mean(losses[-LOSS_WINDOW:])),
        stopped_at_time_bound=stopped,
    )
    return student.eval(), record


def trained_onnx(
    model: LoadedModel,
    data: Dataset,
    quantizer: Quantizer,
    settings: TrainingSettings,
    progress: bool = True,
) -> tuple[Path, TrainingRecord]:
    """The trained module exported to FP32 ONNX: from the cache when the source, the training
    rows and the settings are unchanged, else trained now and cached."""
    if model.trainable is None:
        raise QuantizationError(f"{model.source} has no trainable module")
    key = cache_key(model, data, quantizer, settings)
    folder = qat_cache_dir(model.name)
    onnx_path, record_path = (
        folder / f"{quantizer.mode}-{key}.onnx",
        folder / f"{quantizer.mode}-{key}.json",
    )
    if onnx_path.is_file() and record_path.is_file():
        try:
            record = TrainingRecord(**json.loads(record_path.read_text()))
            record.cache_hit = True
            return onnx_path, record
        except (TypeError, ValueError) as e:
            log.warning("ignoring unreadable QAT cache entry %s: %s", record_path, e)
    module, record = train(model, data, quantizer, settings, progress)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qat-", dir=folder))
    try:
        model.trainable.export(module, tmp / "model.onnx")
        record.cache_file = onnx_path.name
        (tmp / "record.json").write_text(json.dumps(asdict(record), indent=1))
        os.replace(tmp / "model.onnx", onnx_path)
        os.replace(tmp / "record.json", record_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return onnx_path, record
