"""BF16: the FP32 ONNX file run by OpenVINO with its BF16 inference-precision hint.

Only where the CPU executes BF16 natively (AMX-BF16 or AVX512-BF16): elsewhere OpenVINO would
emulate it (or quietly stay f32), so the variant would be a slower or mislabelled FP32 and the
builder skips it with a note. The variant file is the FP32 ONNX itself rather than an OpenVINO IR:
OpenVINO compiles both to the same BF16 graph, the ONNX file keeps Triton's ``model.onnx`` layout
(one file, readable by every engine and by Triton's OpenVINO backend), and converting to IR only
saved load time (docs/engines.md has the numbers).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from builder import hostinfo
from builder.precisions.base import BuildContext, VariantResult
from builder.sources.base import LoadedModel

if TYPE_CHECKING:
    from builder.options import BuildOptions

ENGINE = "openvino"
ENGINE_OPTIONS = {"inference_precision": "bf16"}
NO_NATIVE_BF16 = (
    "CPU reports neither amx_bf16 nor avx512_bf16: BF16 would be emulated and slower; skipped"
)


def openvino_missing() -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return f"OpenVINO (which runs BF16 variants) is not installed: {e}; skipped"
    return None


class BF16:
    name = "bf16"

    def skip_reason(self, model: LoadedModel, options: BuildOptions) -> str | None:
        if not hostinfo.supports_bf16():
            return NO_NATIVE_BF16
        if options.engine and options.engine != ENGINE:
            return f"BF16 runs on the {ENGINE} engine only; --engine {options.engine} excludes it"
        return openvino_missing()

    def build(self, ctx: BuildContext, out_path: Path) -> VariantResult:
        from common.engines import get_engine
        from common.engines.openvino_engine import OpenVinoSession

        shutil.copyfile(ctx.fp32_path, out_path)
        session = get_engine(ENGINE).load(out_path, ENGINE_OPTIONS, ctx.options.threads)
        assert isinstance(session, OpenVinoSession)  # ENGINE is openvino
        effective = str(session.effective_precision)
        return VariantResult(
            out_path,
            engine=ENGINE,
            engine_options=dict(ENGINE_OPTIONS),
            details={
                "file": "FP32 ONNX (OpenVINO applies the BF16 hint when compiling)",
                "inference_precision_hint": "bf16",
                "effective_precision_on_build_host": effective,
                "native_bf16": hostinfo.supports_bf16(),
            },
        )
