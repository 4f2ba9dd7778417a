"""Where a model's dynamic-INT8 error comes from, and what quantization-aware training does to
it (docs/lab/qat.md). ``python -m lab.qat_probe minilm [--train]``:

- ``ranges``: for each Linear input, its absolute maximum over the evaluation batches with the
  padding (what ONNX Runtime's ``DynamicQuantizeLinear`` sees) and over the real tokens only;
- ``emulated``: the loss vs FP32 (points, 100 x (1 - mean cosine)) of the PyTorch module with
  ``builder.qat``'s fake quantization, all of it or one part (weights, Linear inputs,
  embedding tables), on the padded evaluation batches, and with the batches trimmed to their
  longest mask; next to it ONNX Runtime's own fully quantized dynamic INT8 of the same file;
- ``--train``: ``builder.qat.trained_onnx`` with the build's settings (the build reuses its
  cache entry), the emulated evaluation loss at each held-out scoring (recorded, never used to
  choose), then the trained FP32 file and its ONNX Runtime dynamic INT8 evaluated, and their
  throughput against FP32 at the build's speed batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from builder.evaluate import Evaluator
from builder.sources import load_model
from builder.sources.base import Dataset, LoadedModel


def _fq_parts(module: Any) -> dict[str, list[Any]]:
    """The FakeQuantize modules ``attach_fake_quant`` put on ``module``, by part."""
    import torch

    parts: dict[str, list[Any]] = {"weights": [], "inputs": [], "tables": []}
    for m in module.modules():
        fqs = getattr(getattr(m, "parametrizations", None), "weight", None)
        if isinstance(m, torch.nn.Embedding) and fqs is not None:
            parts["tables"].append(fqs[0].fq)
        elif fqs is not None:
            parts["weights"].append(fqs[0].fq)
        if "input_fake_quant" in m._modules:
            parts["inputs"].append(m.input_fake_quant)
    return parts


def _outputs(module: Any, data: Dataset, names: list[str], batch: int, trim: bool) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for rows in data.batches(batch):
            arrays = [rows[n] for n in names]
            if trim:
                longest = int(rows["attention_mask"].sum(axis=1).max())
                arrays = [a[:, :longest] for a in arrays]
            xs = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
            y = module(*xs)
            out.append((y[0] if isinstance(y, tuple | list) else y).numpy())
    return np.concatenate(out)


def _loss(reference: np.ndarray, candidate: np.ndarray) -> float:
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    return float(100 * (1 - (a * b).sum(axis=1).mean()))


def emulated(model: LoadedModel, batch: int) -> dict[str, float]:
    """Emulated dynamic-INT8 loss of the untrained module: all parts, each part alone, trimmed."""
    import copy

    from builder.qat import Quantizer, attach_fake_quant

    names = model.trainable.input_names
    data = model.evaluation
    fp32 = _outputs(model.trainable.module, data, names, batch, False)
    student = copy.deepcopy(model.trainable.module).eval()
    attach_fake_quant(student, Quantizer("dynamic"))
    parts = _fq_parts(student)
    out = {"all": _loss(fp32, _outputs(student, data, names, batch, False))}
    out["all, batches trimmed to their longest mask"] = _loss(
        fp32, _outputs(student, data, names, batch, True)
    )
    for only in parts:
        for name, fqs in parts.items():
            for fq in fqs:
                (fq.enable_fake_quant if name == only else fq.disable_fake_quant)()
        out[f"{only} only"] = _loss(fp32, _outputs(student, data, names, batch, False))
    return out


def ranges(model: LoadedModel, batch: int) -> list[dict[str, Any]]:
    """Each Linear input's absmax with and without the padded positions (evaluation batches)."""
    import torch

    module = model.trainable.module
    names = model.trainable.input_names
    seen: dict[str, list[float]] = {}
    mask_now: list[torch.Tensor] = []
    handles = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):

            def hook(mod: Any, args: tuple[Any, ...], name: str = name) -> None:
                x = args[0].detach().abs()
                real = x[mask_now[0].bool()] if x.ndim == 3 else x
                seen.setdefault(name, [0.0, 0.0])
                seen[name][0] = max(seen[name][0], float(x.max()))
                seen[name][1] = max(seen[name][1], float(real.max()))

            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for rows in model.evaluation.batches(batch):
            mask_now[:] = [torch.from_numpy(rows["attention_mask"])]
            module(*[torch.from_numpy(rows[n]) for n in names])
    for h in handles:
        h.remove()
    return [
        {"layer": k, "padded": round(v[0], 3), "real": round(v[1], 3), "ratio": v[0] / v[1]}
        for k, v in seen.items()
    ]


def smoothed(
    model: LoadedModel, batch: int, alphas: tuple[float, ...], work: Path | None = None
) -> dict[str, Any]:
    """An upper bound for "shrink the outliers that set the ranges": the emulated dynamic-INT8
    loss after a function-preserving per-channel rescaling of every Linear's input (SmoothQuant:
    x / s into the quantizer, the weight's input columns times s, s_c = max|x_c|^a /
    max|W_:,c|^(1-a)), channel maxima from 64 calibration rows, never the evaluation rows.
    In FP32 the output is unchanged; only the quantization sees smaller ranges. With ``work``:
    also exported (the rescaling as a Mul before each MatMul), quantized by ONNX Runtime's
    ``quantize_dynamic`` and evaluated and timed against the FP32 file."""
    import copy

    import torch

    from builder.qat import Quantizer, attach_fake_quant

    names = model.trainable.input_names
    module = model.trainable.module
    data = model.evaluation
    fp32 = _outputs(module, data, names, batch, False)
    xmax: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):

            def hook(mod: Any, args: tuple[Any, ...], name: str = name) -> None:
                a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
                xmax[name] = torch.maximum(xmax.get(name, a), a)

            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for rows in model.calibration.take(64).batches(batch):
            module(*[torch.from_numpy(rows[n]) for n in names])
    for h in handles:
        h.remove()

    class Scaled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Linear, s: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("inv", 1.0 / s)
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x * self.inv)

    out = {}
    for alpha in alphas:
        student = copy.deepcopy(module).eval()
        for name, m in list(student.named_modules()):
            if name in xmax:
                w = m.weight.detach()
                s = (xmax[name].clamp(min=1e-5) ** alpha) / (
                    w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)
                )
                with torch.no_grad():
                    m.weight.mul_(s)
                parent, _, child = name.rpartition(".")
                setattr(student.get_submodule(parent), child, Scaled(m, s))
        fp32_smoothed = _outputs(student, data, names, batch, False)
        attach_fake_quant(student, Quantizer("dynamic"))
        out[f"alpha {alpha}: FP32 (unchanged)"] = _loss(fp32, fp32_smoothed)
        out[f"alpha {alpha}: dynamic INT8 emulated"] = _loss(
            fp32, _outputs(student, data, names, batch, False)
        )
        if work is not None:
            out[f"alpha {alpha}: onnxruntime"] = _smoothed_onnx(model, student, alpha, work)
    return out


def _smoothed_onnx(model: LoadedModel, student: Any, alpha: float, work: Path) -> dict[str, Any]:
    from builder.pipeline import measured_speedup, speed_batch
    from builder.precisions.int8 import preprocess
    from builder.precisions.int8_dynamic import quantize_dynamic_int8
    from builder.prepare import optimize_basic
    from builder.qat import detach_fake_quant

    for m in student.modules():  # the fake quantization off: export the FP32 module
        for h in list(m._forward_pre_hooks):
            del m._forward_pre_hooks[h]
    detach_fake_quant(student, [])
    fp32 = optimize_basic(model.fp32_onnx, work / "fp32.onnx")
    raw = work / f"smoothed-{alpha}.onnx"
    model.trainable.export(student, raw)
    pre = preprocess(optimize_basic(raw, work / f"smoothed-{alpha}-opt.onnx"), work / "s-pre.onnx")
    q = work / f"smoothed-{alpha}-dynamic.onnx"
    quantize_dynamic_int8(pre, q)
    evaluator = Evaluator(model.task, model.evaluation, fp32, 0, 32)
    timer = measured_speedup(fp32, model.evaluation, speed_batch(model))
    return {
        "fp32_loss": evaluator.quality(pre)["accuracy_loss"],
        "dynamic_int8_loss": evaluator.quality(q)["accuracy_loss"],
        "speedup_vs_fp32_b16": timer(q),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a trainable source (minilm, hf:FOLDER, torch:...)")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--out", type=Path, default=Path("qat_probe.json"))
    parser.add_argument(
        "--skip-analysis", action="store_true", help="no ranges / untrained emulation"
    )
    parser.add_argument(
        "--max-seconds", type=float, help="training bound (default: the build's, 900 s)"
    )
    parser.add_argument("--no-range-gradient", action="store_true")
    parser.add_argument(
        "--smoothing", type=float, nargs="*", help="SmoothQuant bound for these alphas, then stop"
    )
    parser.add_argument(
        "--no-curve", action="store_true", help="no emulated evaluation at each scoring"
    )
    parser.add_argument("--token-weight", type=float, help="per-token term (0: none)")
    parser.add_argument(
        "--calibration-only", action="store_true", help="train on the calibration rows alone"
    )
    args = parser.parse_args(argv)

    import torch  # noqa: F401  (before onnxruntime: the build's import order)

    from builder.pipeline import speed_batch
    from builder.precisions.int8 import host_quant_types, preprocess
    from builder.precisions.int8_dynamic import quantize_dynamic_int8
    from builder.precisions.qat_options import QatOptions
    from builder.prepare import optimize_basic
    from builder.qat import DEFAULT_LR, Quantizer, TrainingSettings, trained_onnx

    work = Path(tempfile.mkdtemp(prefix="qat-probe-"))
    model = load_model(args.model, work)
    batch = 32
    report: dict[str, Any] = {}
    if args.smoothing:
        report["smoothed"] = smoothed(model, batch, tuple(args.smoothing), work)
        print(json.dumps(report, indent=1))
        args.out.write_text(json.dumps(report, indent=1))
        return
    t0 = time.monotonic()
    if not args.skip_analysis:
        r = ranges(model, batch)
        report["ranges"] = {
            "layers": len(r),
            "widened_by_padding_over_1.1x": sum(x["ratio"] > 1.1 for x in r),
            "largest_ratio": max(r, key=lambda x: x["ratio"]),
            "largest_inputs": sorted(r, key=lambda x: -x["padded"])[:6],
        }
        report["emulated_untrained"] = emulated(model, batch)
    fp32 = optimize_basic(model.fp32_onnx, work / "fp32.onnx")
    evaluator = Evaluator(model.task, model.evaluation, fp32, 0, batch)
    ptq = work / "ptq.onnx"
    quantize_dynamic_int8(preprocess(fp32, work / "pre.onnx"), ptq)
    report["onnxruntime_post_training_dynamic"] = evaluator.quality(ptq)["accuracy_loss"]
    report["probe_seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report, indent=1))

    if args.train:
        qopts = QatOptions()
        types = host_quant_types()
        settings = TrainingSettings(
            args.steps or qopts.steps,
            qopts.batch_size,
            args.lr or DEFAULT_LR[model.transformer],
            args.max_seconds or qopts.max_seconds,
        )
        if args.no_range_gradient:
            settings.range_gradient = False
        if args.token_weight is not None:
            settings.token_weight = args.token_weight
        quantizer = Quantizer("dynamic", types.activation, types.reduce_range)
        names = model.trainable.input_names
        reference = _outputs(model.trainable.module, model.evaluation, names, batch, False)
        curve: list[dict[str, float]] = []

        hook_cpu = [0.0]

        def on_validation(step: int, held_out: float, student: Any) -> None:
            c0 = time.process_time()
            em = _loss(reference, _outputs(student, model.evaluation, names, batch, False))
            hook_cpu[0] += time.process_time() - c0
            curve.append({"step": step, "held_out": held_out, "evaluation_emulated": em})
            print(curve[-1], flush=True)

        from builder import qat

        original = qat.train

        def train(*a: Any, **k: Any) -> Any:
            return original(*a, **k, on_validation=on_validation)

        if not args.no_curve:
            qat.train = train
        data = model.calibration.take(256)  # + the training-only rows, as the build does
        if model.training is not None and not args.calibration_only:
            data = data.concat(model.training)
        cpu0 = time.process_time()  # CPU seconds: the host is shared, wall time is not ours
        onnx_path, record = trained_onnx(model, data, quantizer, settings, True)
        training_cpu = time.process_time() - cpu0 - hook_cpu[0]
        trained = optimize_basic(onnx_path, work / "trained.onnx")
        qfile = work / "trained-dynamic.onnx"
        quantize_dynamic_int8(preprocess(trained, work / "trained-pre.onnx"), qfile)
        from builder.pipeline import measured_speedup

        timer = measured_speedup(fp32, model.evaluation, speed_batch(model))
        report["train"] = {
            "record": record.__dict__,
            "training_and_export_cpu_seconds": round(training_cpu, 1),
            "curve": curve,
            "trained_fp32_loss": evaluator.quality(trained)["accuracy_loss"],
            "trained_dynamic_int8_loss": evaluator.quality(qfile)["accuracy_loss"],
            "speedup_vs_fp32_b16": timer(qfile),
            "post_training_speedup_vs_fp32_b16": timer(ptq),
        }
        print(json.dumps(report["train"], indent=1, default=str))
    args.out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
