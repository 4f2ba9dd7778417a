"""Build a TensorRT engine (``model.plan``) from an ONNX variant with the ``tensorrt`` Python API.

Precision comes from the ONNX file, never from builder flags: TensorRT 11 removed the FP16/INT8
builder flags and the INT8 calibrator, so the FP16 variant is our FP16 ONNX and the INT8 variant
is an explicit Q/DQ ONNX (see :mod:`builder.gpu.quant`). The network is strongly typed: on
TensorRT 10.x through the ``STRONGLY_TYPED`` creation flag, on 11.x always (the flag is accepted
and ignored there). TensorRT older than 10 is refused.

The timing cache is loaded from the repository when present and saved back after every build,
so later builds on the same GPU reuse the kernel timings. Plans are not portable across GPU
models or TensorRT versions; the returned metadata (TensorRT version, GPU name, compute
capability) goes into the manifest for that reason.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.gpu.device import GpuInfo
from builder.gpu.errors import INSTALL_HINT, EngineBuildError, GpuUnavailableError

MIN_TENSORRT_MAJOR = 10
DEFAULT_DIM_RANGE = (1, 128, 512)  # non-batch dynamic dims (e.g. sequence length): min/opt/max
TIMING_CACHE_DIR = Path(".cache") / "tensorrt"


@dataclass(frozen=True)
class ShapeRange:
    """One input's optimization-profile shapes (full shapes, batch dimension included)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass
class EngineBuildOptions:
    """How to build one engine.

    ``max_batch_size`` > 0 means the first dimension of every input is the batch: its profile is
    min 1, opt ``opt_batch_size`` (default: ``max_batch_size``), max ``max_batch_size``. Other
    dynamic dimensions take their range from ``dim_ranges`` (key ``"input:axis"`` or ``"input"``),
    else from ``default_dim_range``.
    """

    max_batch_size: int = 32
    opt_batch_size: int | None = None
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    default_dim_range: tuple[int, int, int] | None = DEFAULT_DIM_RANGE
    workspace_bytes: int | None = None
    builder_optimization_level: int | None = None  # TensorRT default (3) when None
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        opt = self.opt_batch_size
        if opt is not None and not 1 <= opt <= max(self.max_batch_size, 1):
            raise ValueError(
                f"opt_batch_size must be in 1..{self.max_batch_size}, got {self.opt_batch_size}"
            )
        for key, rng in {**self.dim_ranges, "default_dim_range": self.default_dim_range}.items():
            if rng is not None and not (1 <= rng[0] <= rng[1] <= rng[2]):
                raise ValueError(f"range for {key} must satisfy 1 <= min <= opt <= max, got {rng}")


def timing_cache_path(repository: Path, gpu: GpuInfo | None = None) -> Path:
    """``<repository>/.cache/tensorrt/timing_sm90.cache`` (one cache per GPU architecture)."""
    suffix = f"_sm{gpu.sm}" if gpu else ""
    return Path(repository) / TIMING_CACHE_DIR / f"timing{suffix}.cache"


def profile_shapes(
    inputs: Sequence[tuple[str, Sequence[int]]], options: EngineBuildOptions
) -> dict[str, ShapeRange]:
    """The optimization profile for the network's inputs (name, shape with -1 for dynamic)."""
    out: dict[str, ShapeRange] = {}
    for name, shape in inputs:
        lo: list[int] = []
        opt: list[int] = []
        hi: list[int] = []
        for axis, dim in enumerate(shape):
            dim = int(dim)
            if dim >= 0:
                rng = (dim, dim, dim)
            elif axis == 0 and options.max_batch_size > 0:
                top = options.max_batch_size
                rng = (1, options.opt_batch_size or top, top)
            else:
                found = options.dim_ranges.get(f"{name}:{axis}") or options.dim_ranges.get(name)
                rng = found or options.default_dim_range
                if rng is None:
                    raise EngineBuildError(
                        f"input {name!r} axis {axis} is dynamic and has no range; "
                        f'give dim_ranges["{name}:{axis}"] = (min, opt, max)'
                    )
            lo.append(rng[0])
            opt.append(rng[1])
            hi.append(rng[2])
        out[name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
    return out


def import_tensorrt() -> Any:
    """``import tensorrt`` with one clear line when it is missing or too old."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise GpuUnavailableError(
            f"the TensorRT Python package is not installed ({e}); on a GPU host run: {INSTALL_HINT}"
        ) from e
    major = tensorrt_major(trt)
    if major < MIN_TENSORRT_MAJOR:
        raise GpuUnavailableError(
            f"TensorRT {trt.__version__} is too old: engines here need TensorRT >= "
            f"{MIN_TENSORRT_MAJOR} (strongly typed networks); run: {INSTALL_HINT}"
        )
    return trt


def tensorrt_major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that prints warnings and keeps errors for the exception message."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # 0 internal error, 1 error, 2 warning, 3 info, 4 verbose
            if level <= 1:
                self.errors.append(msg)
            if level <= 2:
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return _Logger()


def network_flags(trt: Any) -> int:
    """Creation flags for a strongly typed network (11.x: always strongly typed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if tensorrt_major(trt) >= 11:
            return 0
        raise EngineBuildError(
            f"TensorRT {trt.__version__} has no strongly typed networks; "
            f"FP16/INT8 engines need TensorRT >= 10 ({INSTALL_HINT})"
        )
    return 1 << int(flag)


def _parser_error_text(err: Any) -> str:
    """``node NAME (OpType): description`` where the binding has those accessors (10.x)."""
    try:
        node = err.node_name() or f"#{err.node()}"
        return f"node {node} ({err.node_operator()}): {err.desc()}"
    except Exception:
        return str(err)


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if ok:
        return
    errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
    detail = "; ".join(e.strip().replace("\n", " ") for e in errors) or "no parser errors reported"
    raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {detail}")


def _attach_timing_cache(config: Any, path: Path | None) -> dict[str, Any]:
    """Load the timing cache from ``path`` if present; a cache TensorRT rejects is replaced."""
    state: dict[str, Any] = {"path": str(path) if path else None, "loaded": False, "bytes": 0}
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    accepted = cache is not None and config.set_timing_cache(cache, False)
    if data and accepted:
        state.update(loaded=True, bytes=len(data))
    elif data:
        # Made by another GPU or TensorRT version: start from an empty cache (it gets overwritten).
        state["rejected"] = True
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return state


def _save_timing_cache(config: Any, path: Path | None) -> int:
    if path is None:
        return 0
    cache = config.get_timing_cache()
    if cache is None:
        return 0
    blob = bytes(memoryview(cache.serialize()))
    atomic_write_bytes(path, blob)
    return len(blob)


def atomic_write_bytes(target: Path, data: bytes | memoryview) -> None:
    """Write through a temporary sibling and rename, so no reader sees half a file."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise EngineBuildError(f"cannot write {target}: {e.strerror or e}") from e


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    options: EngineBuildOptions,
    gpu: GpuInfo | None = None,
) -> dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path``; return the metadata for ``VariantRecord.details``."""
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise EngineBuildError(f"ONNX file {onnx_path} does not exist")
    trt = import_tensorrt()
    if gpu is None:
        from builder.gpu.device import gpu_info

        gpu = gpu_info()
    start = time.perf_counter()
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    _parse(trt, network, logger, onnx_path)

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    ranges = profile_shapes([(t.name, tuple(t.shape)) for t in inputs], options)

    config = builder.create_builder_config()
    if options.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    if options.builder_optimization_level is not None:
        config.builder_optimization_level = int(options.builder_optimization_level)
    profile = builder.create_optimization_profile()
    for name, rng in ranges.items():
        profile.set_shape(name, rng.min, rng.opt, rng.max)
    config.add_optimization_profile(profile)
    cache_state = _attach_timing_cache(config, options.timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        why = "; ".join(logger.errors[-3:]) or "see the TensorRT log above"
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path}: {why}")
    atomic_write_bytes(plan_path, memoryview(serialized))
    cache_state["saved_bytes"] = _save_timing_cache(config, options.timing_cache)

    return {
        "plan": plan_path.name,
        "plan_bytes": plan_path.stat().st_size,
        "onnx_sha256": file_sha256(onnx_path),
        "tensorrt_version": str(trt.__version__),
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "cuda_driver": gpu.driver_version,
        "strongly_typed": True,
        "profile": {name: rng.to_dict() for name, rng in ranges.items()},
        "timing_cache": cache_state,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
