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
  affine with the range of each batch, as ``DynamicQuantizeLinear`` computes it at run time,
  computed under autograd (``dynamic_range_fq``) so that the loss reaches the outliers that
  set the range;
- ``Embedding`` weights (the Gather ONNX Runtime quantizes): per-tensor affine with the
  activation type (ONNX Runtime quantizes a Gather's table as an activation: U8 over [min, max]).

The rows are used as the source gives them: padded as the evaluation (and the deployed model)
pads them, because dynamic INT8 takes its per-tensor ranges over the whole input tensor,
padded positions included; trimming the padding would train against other ranges.

The objective: cross-entropy with the labels when the training rows have them (classifiers),
otherwise distillation to the FP32 module's outputs (1 - cosine for embeddings, KL divergence
of the softmax for logits; the FP32 outputs are computed once), plus, for sources that declare
per-token states (``Trainable.token_states``: an encoder's last hidden state), their
distillation over the real tokens. Sources may give more rows for training only
(``LoadedModel.training``, disjoint from the evaluation rows). The module stays in eval mode
(dropout off, batch-norm statistics frozen); gradients pass the rounding straight through.
A held-out part of the training rows (never the evaluation rows) is scored, fake-quantized,
before training and every few steps; the weights with the best held-out loss are kept (the
original weights when training never improves on them), so the fine-tuning cannot drift the
model away on a few hundred rows. The trained module is exported without fake quantization
(the quantizer re-derives the same weight grid from the trained weights).

Trained exports are cached under ``$PRECISION_SERVE_CACHE/qat/<model>/`` keyed by a hash of the
source's FP32 file, the training rows and the settings: an unchanged build reuses them.
"""

from __future__ import annotations

import copy
import dataclasses
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
from builder.sources.base import Dataset, LoadedModel, Trainable

log = logging.getLogger(__name__)

LIBRARY = "torch.ao.quantization FakeQuantize"
QAT_MODES = ("static", "dynamic")
DEFAULT_LR = {True: 2e-5, False: 1e-4}  # transformer -> lr
# Bump when the training changes what it produces (part of the cache key). v5: training starts
# from the SmoothQuant-rescaled module when one is chosen.
RECIPE = "qat-v5"
LOSS_WINDOW = 10  # steps averaged for the loss reported at the start and the end
HELD_OUT_FRACTION = 1 / 8  # of the training rows, scored to pick the weights kept
HELD_OUT_MAX = 32  # rows (one evaluation batch: dynamic ranges are per batch)
VALIDATIONS = 10  # held-out scorings over a training (plus one before it)


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
    # Dynamic INT8: the per-batch range computed under autograd, so the loss reaches the
    # activations that set it (False: torch.ao's observer, no gradient to the range).
    range_gradient: bool = True
    # Weight of the per-token distillation term (sources that declare their token states).
    token_weight: float = 1.0
    # The SmoothQuant rescaling trained with ("alpha:hash of the scales"; None: none).
    smoothing: str | None = None


@dataclass
class LinearScales:
    """SmoothQuant scales for the source module's Linears (``builder.smoothquant``): each
    Linear's input is divided by ``scales[name]`` and its weight's input columns multiplied by
    it while training; the trained module is handed back unscaled (the export is rescaled on
    the ONNX graph with the same scales)."""

    alpha: float
    key: str
    scales: dict[str, np.ndarray]


def linear_scales(module: Any, by_weight: dict[bytes, np.ndarray]) -> dict[str, np.ndarray]:
    """The scale of each ``torch.nn.Linear`` of ``module`` whose weight (as the exported
    [in, out] matrix) is a key of ``by_weight`` (``builder.smoothquant.weight_scales``)."""
    import torch

    from builder.smoothquant import digest

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            s = by_weight.get(digest(m.weight.detach().numpy().T))
            if s is not None and s.shape[0] == m.in_features:
                out[name] = s
    return out


def _smooth_linears(module: Any, scales: dict[str, np.ndarray]) -> list[tuple[Any, str, Any]]:
    """Rescale ``module``'s Linears in place (x / s in, weight columns x s): same function."""
    import torch

    class Smoothed(torch.nn.Module):
        def __init__(self, inner: torch.nn.Linear, s: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("inverse_scale", 1.0 / s)
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x * self.inverse_scale)

    done = []
    for name, s in scales.items():
        inner = module.get_submodule(name)
        st = torch.from_numpy(np.asarray(s, np.float32))
        with torch.no_grad():
            inner.weight.mul_(st[None, :])
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, Smoothed(inner, st))
        done.append((parent, child, st))
    return done


def _unsmooth_linears(done: list[tuple[Any, str, Any]]) -> None:
    import torch

    for parent, child, st in done:
        inner = getattr(parent, child).inner
        with torch.no_grad():
            inner.weight.div_(st[None, :])
        setattr(parent, child, inner)


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
    held_out_rows: int = 0
    # CPU seconds of this process over the training (threads included): a shared host
    # stretches wall time, not this.
    cpu_seconds: float | None = None
    held_out_loss_start: float | None = None  # fake-quantized, before training
    held_out_loss_best: float | None = None
    best_step: int = 0  # the step whose weights were kept (0: the original weights)
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
        "recipe": RECIPE,
        "quantizer": asdict(quantizer),
        "settings": asdict(settings),
        "torch": torch.__version__,
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:24]


def qat_cache_dir(model: str) -> Path:
    return cache_root() / "qat" / model


# ---- fake quantization -----------------------------------------------------------------------


def _weight_fq(reduce_range: bool) -> Any:
    import torch
    from torch.ao.quantization import FakeQuantize
    from torch.ao.quantization.observer import MovingAveragePerChannelMinMaxObserver

    bound = 64 if reduce_range else 127
    return FakeQuantize(
        observer=MovingAveragePerChannelMinMaxObserver,
        averaging_constant=1.0,  # the current weights' range
        quant_min=-bound,
        quant_max=bound,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )


def _table_fq(quantizer: Quantizer) -> Any:
    """An embedding table as ONNX Runtime quantizes a Gather's data: per tensor, affine, with
    the activation type (U8 for dynamic INT8), over the current table's [min, max]."""
    import torch
    from torch.ao.quantization import FakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver

    unsigned = quantizer.mode == "dynamic" or quantizer.activation == "QUInt8"
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        averaging_constant=1.0,
        quant_min=0 if unsigned else -128,
        quant_max=255 if unsigned else 127,
        dtype=torch.quint8 if unsigned else torch.qint8,
        qscheme=torch.per_tensor_affine,
    )


def dynamic_range_fq() -> Any:
    """Dynamic INT8's activation quantizer with a gradient to its range: per tensor, U8,
    affine over [min(x, 0), max(x, 0)] of each batch - ``DynamicQuantizeLinear``'s scale and
    zero point - computed under autograd and applied with torch's learnable fake-quantize
    kernel (``torch.ao``'s ``_LearnableFakeQuantize`` uses it; LSQ gradients). Rounding passes
    its gradient straight through; the scale's gradient flows on to the batch's extreme
    values, so training can shrink the outliers that set the range (an observer takes min/max
    without autograd: the range then has no gradient). Same forward values as torch.ao's
    ``FakeQuantize`` with ``MovingAverageMinMaxObserver(averaging_constant=1)``."""
    import torch
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    class _DynamicRangeFakeQuantize(FakeQuantizeBase):
        quant_min, quant_max = 0, 255

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.tensor([1.0]))
            self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.fake_quant_enabled[0]:
                return x
            lo = torch.clamp(x.min(), max=0.0)
            hi = torch.clamp(x.max(), min=0.0)
            scale = torch.clamp((hi - lo) / 255.0, min=torch.finfo(torch.float32).eps)
            zero = torch.clamp(torch.round(-lo / scale), 0, 255).detach()
            self.scale.copy_(scale.detach().reshape(1))
            self.zero_point.copy_(zero.reshape(1).to(torch.int32))
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale.reshape(1), zero.reshape(1), 0, 255, 1.0
            )

        def calculate_qparams(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return self.scale, self.zero_point

    return _DynamicRangeFakeQuantize()


def _activation_fq(quantizer: Quantizer, range_gradient: bool = False) -> Any:
    import torch
    from torch.ao.quantization import FakeQuantize
    from torch.ao.quantization.observer import MinMaxObserver, MovingAverageMinMaxObserver

    if quantizer.mode == "dynamic" and range_gradient:
        return dynamic_range_fq()
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


def attach_fake_quant(module: Any, quantizer: Quantizer, range_gradient: bool = False) -> list[Any]:
    """Fake-quantize ``module`` in place (weights and the inputs of its Linear/Conv layers);
    returns the hook handles (``detach_fake_quant`` undoes everything). ``range_gradient``:
    dynamic activation ranges computed under autograd (``dynamic_range_fq``)."""
    import torch
    from torch.nn.utils import parametrize

    handles = []
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for m in list(module.modules()):
        if isinstance(m, layers):
            fq = _weight_fq(quantizer.reduce_range and quantizer.mode == "static")
            parametrize.register_parametrization(m, "weight", _Parametrized.make(fq))
            m.add_module("input_fake_quant", _activation_fq(quantizer, range_gradient))

            def pre_hook(mod: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (mod.input_fake_quant(args[0]), *args[1:])

            handles.append(m.register_forward_pre_hook(pre_hook))
        elif isinstance(m, torch.nn.Embedding):
            parametrize.register_parametrization(
                m, "weight", _Parametrized.make(_table_fq(quantizer))
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
    """The rows ``idx`` as tensors, padded as the source padded them: the evaluation and the
    deployed model run them so, and dynamic INT8's per-tensor ranges include the padding."""
    import torch

    return [torch.from_numpy(np.ascontiguousarray(data.inputs[n][idx])) for n in names]


def split_held_out(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) row indices: a seeded 1/8 of the rows (at most one evaluation
    batch, none below 16 rows) is held out to pick the weights kept."""
    held = min(HELD_OUT_MAX, int(n * HELD_OUT_FRACTION)) if n >= 16 else 0
    order = np.random.default_rng(seed + 1).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


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
    on_validation: Any = None,
    smoothing: LinearScales | None = None,
) -> tuple[Any, TrainingRecord]:
    """Fine-tune a copy of the source's module with ``quantizer`` emulated; returns the module
    with the best held-out loss (fake quantization removed) and what happened.
    ``on_validation(step, held_out_loss, module)``, if given, is called at each scoring (the
    module still fake-quantized: a lab hook). ``smoothing``: trained rescaled (SmoothQuant),
    handed back unscaled."""
    import torch
    from tqdm.auto import tqdm

    if model.trainable is None:
        raise QuantizationError(f"{model.source} has no trainable module")
    names = model.trainable.input_names
    objective = objective_for(model, data)
    loss_fn = _loss_fn(objective)
    # Held-out rows score closeness to FP32 only (the labels' term would reward moving away).
    held_fn = _loss_fn(objective.split(" + ", 1)[-1])
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    n = len(data)
    train_idx, held_idx = split_held_out(n, settings.seed)
    started = time.monotonic()  # the FP32 outputs count as training time
    cpu_started = time.process_time()
    per_token = settings.token_weight > 0 and model.trainable.token_states is not None
    teacher = copy.deepcopy(model.trainable.module).eval()
    teacher_tokens = _TokenStates(teacher, model.trainable) if per_token else None
    targets, token_targets = _teacher_outputs(
        teacher, data, names, settings.batch_size, teacher_tokens
    )
    del teacher, teacher_tokens
    student = copy.deepcopy(model.trainable.module).eval()  # eval: no dropout, BN frozen
    smoothed = _smooth_linears(student, smoothing.scales) if smoothing else []
    student_tokens = _TokenStates(student, model.trainable) if per_token else None
    if student_tokens is not None:
        objective += (
            f" + per-token distillation of {model.trainable.token_states}'s states "
            f"(relative squared error, weight {settings.token_weight:g})"
        )
    handles = attach_fake_quant(student, quantizer, settings.range_gradient)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1.0 - s / settings.steps)
    )
    labels = None if data.labels is None else torch.from_numpy(np.asarray(data.labels))

    def score() -> float:  # fake-quantized, in one batch (the evaluation's per-batch ranges)
        with torch.no_grad():
            out = _first(student(*_batch_tensors(data, names, held_idx)))
            return float(held_fn(out, targets[held_idx], None))

    every = max(1, settings.steps // VALIDATIONS)
    held: list[tuple[int, float]] = []
    best: dict[str, Any] | None = None

    hook_seconds = 0.0  # time in on_validation: not the training's (nor its bound's)

    def validate(step: int) -> None:
        nonlocal best, hook_seconds
        if len(held_idx) == 0:
            return
        value = score()
        if on_validation is not None:
            t0 = time.monotonic()
            on_validation(step, value, student)
            hook_seconds += time.monotonic() - t0
        if not held or value < min(v for _, v in held):
            best = {k: v.detach().clone() for k, v in student.state_dict().items()}
        held.append((step, value))

    losses: list[float] = []
    stopped = False
    bar = tqdm(range(settings.steps), desc=f"QAT ({quantizer.mode} INT8)", disable=not progress)
    try:
        validate(0)
        for step in bar:
            idx = rng.choice(
                train_idx, size=min(settings.batch_size, len(train_idx)), replace=False
            )
            batch = _batch_tensors(data, names, idx)
            out = _first(student(*batch))
            loss = loss_fn(out, targets[idx], _labels(labels, idx))
            if student_tokens is not None:
                mask = batch[names.index(model.trainable.token_mask)]
                loss = loss + settings.token_weight * _token_loss(
                    student_tokens.states, token_targets[idx], mask
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            over_time = time.monotonic() - started - hook_seconds > settings.max_seconds
            if (step + 1) % every == 0 or step + 1 == settings.steps or over_time:
                validate(step + 1)
            if over_time:
                stopped = True
                log.warning("QAT stopped at its %.0f s bound", settings.max_seconds)
                break
        if best is not None:
            student.load_state_dict(best)
    finally:
        bar.close()
        detach_fake_quant(student, handles)
        _unsmooth_linears(smoothed)
        if student_tokens is not None:
            student_tokens.handle.remove()
    best_step, best_loss = min(held, key=lambda sv: sv[1]) if held else (len(losses), None)
    record = TrainingRecord(
        mode=quantizer.mode,
        objective=objective,
        data=data.description or f"{n} calibration rows",
        rows=len(train_idx),
        steps=len(losses),
        batch_size=settings.batch_size,
        lr=settings.lr,
        seconds=round(time.monotonic() - started - hook_seconds, 1),
        train_loss_start=float(np.mean(losses[:LOSS_WINDOW])),
        train_loss_end=float(np.mean(losses[-LOSS_WINDOW:])),
        stopped_at_time_bound=stopped,
        held_out_rows=len(held_idx),
        cpu_seconds=round(time.process_time() - cpu_started, 1),
        held_out_loss_start=held[0][1] if held else None,
        held_out_loss_best=best_loss,
        best_step=best_step,
    )
    if smoothing is not None:
        record.notes.append(
            f"started from the SmoothQuant-rescaled module (alpha {smoothing.alpha:g}, "
            f"{len(smoothed)} Linears)"
        )
    return student.eval(), record


def _labels(labels: Any, idx: np.ndarray) -> Any:
    return None if labels is None else labels[idx]


class _TokenStates:
    """Captures the per-token states a trainable source declares (``Trainable.token_states``:
    the submodule whose first output is [batch, sequence, hidden]) at each forward."""

    def __init__(self, module: Any, trainable: Trainable) -> None:
        self.states: Any = None
        sub = module.get_submodule(trainable.token_states or "")
        self.handle = sub.register_forward_hook(self._keep)

    def _keep(self, mod: Any, args: Any, out: Any) -> None:
        self.states = out[0]


def _token_loss(student: Any, teacher: Any, mask: Any) -> Any:
    """Relative squared error of the per-token states over the real (unmasked) tokens."""
    m = mask.to(student.dtype).unsqueeze(-1)
    return ((student - teacher) ** 2 * m).sum() / ((teacher**2) * m).sum().clamp(min=1e-12)


def _teacher_outputs(
    teacher: Any,
    data: Dataset,
    names: list[str],
    batch_size: int,
    tokens: _TokenStates | None = None,
) -> tuple[Any, Any]:
    """The FP32 module's first output for every row, and its per-token states when asked
    (once: the teacher does not change)."""
    import torch

    chunks, token_chunks = [], []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            idx = np.arange(start, min(start + batch_size, len(data)))
            chunks.append(_first(teacher(*_batch_tensors(data, names, idx))))
            if tokens is not None:
                token_chunks.append(tokens.states)
    return torch.cat(chunks), torch.cat(token_chunks) if token_chunks else None


def trained_onnx(
    model: LoadedModel,
    data: Dataset,
    quantizer: Quantizer,
    settings: TrainingSettings,
    progress: bool = True,
    smoothing: LinearScales | None = None,
) -> tuple[Path, TrainingRecord]:
    """The trained module exported to FP32 ONNX (unscaled: ``smoothing``'s scales are applied
    on the ONNX graph after): from the cache when the source, the training rows and the
    settings are unchanged, else trained now and cached."""
    if model.trainable is None:
        raise QuantizationError(f"{model.source} has no trainable module")
    if smoothing is not None:  # part of the cache key
        settings = dataclasses.replace(settings, smoothing=f"{smoothing.alpha:g}:{smoothing.key}")
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
    module, record = train(model, data, quantizer, settings, progress, smoothing=smoothing)
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
