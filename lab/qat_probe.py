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
