"""``--max-shape NAME=D1xD2...``: the largest shape an input may take (batch dim excluded).

The manifest records it per input (``TensorSpec.max_shape``); the gateway then refuses larger
inputs before decoding them and sizes its gRPC message limit to the largest valid request
(server/transports/request_bounds.py). Hugging Face sources fill it from the model's own limit
(``max_position_embeddings``); for other sources with dynamic dims only the user knows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from builder.errors import BuildError
from common.model_repository import TensorSpec
from common.model_repository.manifest import check_max_shape


def parse_max_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    """``["input_ids=512", "image=3x224x224"]`` -> {name: dims}; BuildError naming the item."""
    out: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            values = [int(d) for d in dims.lower().split("x")] if sep and dims else []
        except ValueError:
            values = []
        if not name or not values:
            raise BuildError(f"--max-shape {item!r}: expected NAME=D1xD2... (e.g. input_ids=512)")
        out[name] = values
    return out


def apply_max_shapes(inputs: list[TensorSpec], given: dict[str, list[int]]) -> list[TensorSpec]:
    """The inputs with ``given`` max shapes set (over the source's own); BuildError for an
    unknown input or a shape that does not fit the input's."""
    names = {s.name for s in inputs}
    unknown = sorted(set(given) - names)
    if unknown:
        raise BuildError(f"--max-shape: no input named {unknown} (inputs: {sorted(names)})")
    out = []
    for spec in inputs:
        most = given.get(spec.name)
        if most is None:
            out.append(spec)
            continue
        try:
            check_max_shape(spec.name, spec.shape, most)
        except ValueError as e:
            raise BuildError(f"--max-shape: {e}") from None
        out.append(replace(spec, max_shape=list(most)))
    return out
