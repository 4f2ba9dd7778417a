"""FP32: the exported reference model, as is."""

from __future__ import annotations

import shutil
from pathlib import Path

from builder.options import BuildOptions
from builder.precisions.base import BuildContext, VariantResult
from builder.sources.base import LoadedModel


class FP32:
    name = "fp32"

    def skip_reason(self, model: LoadedModel, options: BuildOptions) -> str | None:
        return None

    def build(self, ctx: BuildContext, out_path: Path) -> VariantResult:
        shutil.copyfile(ctx.fp32_path, out_path)
        return VariantResult(out_path)
