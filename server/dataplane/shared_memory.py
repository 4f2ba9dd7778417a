"""Triton's system shared memory extension: registered regions, and tensors read from / written to
them.

A client (``tritonclient.utils.shared_memory``, ``perf_analyzer --shared-memory system``) creates
a POSIX shared memory object (``/dev/shm/<key>``), registers it under a name with an offset and a
byte size, then names the region in an input's or a requested output's parameters
(``shared_memory_region``, ``shared_memory_byte_size``, ``shared_memory_offset``). Inputs are read
straight out of the mapping (no copy until decoding); outputs are written into it and the reply
carries their metadata only, as Triton's does.

The registry is transport-free: the gRPC servicer and the HTTP app call it and translate its
errors (the gateway's family, server/errors.py) in their one place. Regions belong to the process:
with ``--workers`` each worker has its own registry (docs/gateway.md, "Shared memory").
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.model_repository.dtypes import from_datatype
from common.model_repository.errors import DtypeError
from server.dataplane.tensors import WireTensor, encode_raw
from server.errors import GatewayError, InvalidInput, Unsupported

SHM_DIR = Path("/dev/shm")
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
PARAMETERS = (REGION, BYTE_SIZE, OFFSET)


class RegionExists(GatewayError):
    """A region name registered twice (Triton: ALREADY_EXISTS)."""

    code = "ALREADY_EXISTS"


class RegionNotFound(GatewayError):
    """Status asked for a name that is not registered (Triton: NOT_FOUND)."""

    code = "NOT_FOUND"


def cuda_unsupported(call: str) -> Unsupported:
    return Unsupported(
        f"{call}: CUDA shared memory is not supported by this gateway (it serves on CPU); "
        "system shared memory is (register_system_shared_memory)"
    )


@dataclass(frozen=True)
class TensorRef:
    """Where one input or output lives: ``byte_size`` bytes at ``offset`` into ``region``."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass
class Region:
    name: str
    key: str
    offset: int  # into the key's object
    byte_size: int
    _map: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)  # the registered bytes

    def release(self) -> None:
        """Unmap now unless a request still holds a view (then when the last one goes)."""
        try:
            self.view.release()
            self._map.close()
        except BufferError:
            pass


def _nonnegative(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_ref(kind: str, name: str, params: Mapping[str, Any]) -> TensorRef | None:
    """The shared memory location in an input's / output's parameters (None: not in shm)."""
    if REGION not in params:
        stray = [p for p in (BYTE_SIZE, OFFSET) if p in params]
        if stray:
            raise InvalidInput(f"{kind} {name!r}: {', '.join(stray)} given without {REGION}")
        return None
    region, size, offset = params[REGION], params.get(BYTE_SIZE), params.get(OFFSET, 0)
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{kind} {name!r}: {REGION} must be a region name, got {region!r}")
    if not _nonnegative(size):
        raise InvalidInput(
            f"{kind} {name!r}: {BYTE_SIZE} must be a non-negative integer for shared memory "
            f"region {region!r}, got {size!r}"
        )
    if not _nonnegative(offset):
        raise InvalidInput(
            f"{kind} {name!r}: {OFFSET} must be a non-negative integer for shared memory "
            f"region {region!r}, got {offset!r}"
        )
    return TensorRef(region, size, offset)


def _expected_bytes(datatype: str, shape: Sequence[int]) -> int | None:
    """shape x element size, or None where that is not known up front (BYTES, bad dtype)."""
    if datatype == "BYTES" or any(d < 0 for d in shape):
        return None
    try:
        return math.prod(shape) * from_datatype(datatype).itemsize
    except DtypeError:
        return None


def _raw(arr: np.ndarray) -> memoryview | bytes:
    if arr.dtype == np.object_:
        return encode_raw(arr)
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return memoryview(le).cast("B") if le.size else b""


class SystemSharedMemory:
    """The registered system shared memory regions of one gateway."""

    def __init__(self, directory: Path = SHM_DIR, refuse: str | None = None) -> None:
        self.directory = Path(directory)
        self.refuse = refuse  # why registering is refused here (``--workers``), or None
        self._regions: dict[str, Region] = {}

    # ---- the extension's calls ---------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if self.refuse:
            raise Unsupported(f"cannot register shared memory region {name!r}: {self.refuse}")
        if not name:
            raise InvalidInput("a shared memory region needs a name")
        if name in self._regions:
            raise RegionExists(f"shared memory region {name!r} already in manager")
        if not _nonnegative(offset) or not _nonnegative(byte_size) or byte_size == 0:
            raise InvalidInput(
                f"failed to register shared memory region {name!r}: offset must be >= 0 and "
                f"byte_size > 0, got offset {offset!r}, byte_size {byte_size!r}"
            )
        path = self._path(name, key)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise InvalidInput(
                f"unable to open shared memory region {name!r}: key {key!r} ({path}): "
                f"{e.strerror or e}"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidInput(
                    f"failed to register shared memory region {name!r}: offset {offset} + "
                    f"byte_size {byte_size} is beyond the {size} bytes of key {key!r}"
                )
            start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap wants aligned offsets
            mapped = mmap.mmap(fd, byte_size + offset - start, offset=start)
        finally:
            os.close(fd)
        view = memoryview(mapped)[offset - start :]
        self._regions[name] = Region(name, key, offset, byte_size, mapped, view)

    def unregister(self, name: str = "") -> None:
        """One region, or all with ``name`` empty; an unknown name is a no-op (as Triton)."""
        names = [name] if name else list(self._regions)
        for n in names:
            region = self._regions.pop(n, None)
            if region is not None:
                region.release()

    def status(self, name: str = "") -> list[Region]:
        if not name:
            return list(self._regions.values())
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"Unable to find system shared memory region: {name!r}")
        return [region]

    def close(self) -> None:
        self.unregister()

    # ---- tensors -------------------------------------------------------------------------------
    def _slice(self, kind: str, tensor: str, ref: TensorRef) -> memoryview:
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidInput(
                f"{kind} {tensor!r}: shared memory region {ref.region!r} is not registered "
                f"(registered: {sorted(self._regions)})"
            )
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidInput(
                f"{kind} {tensor!r}: offset {ref.offset} + byte size {ref.byte_size} is "
                f"outside shared memory region {ref.region!r} of {region.byte_size} bytes"
            )
        return region.view[ref.offset : ref.offset + ref.byte_size]

    def input_tensor(
        self, name: str, datatype: str, shape: list[int], ref: TensorRef
    ) -> WireTensor:
        """The input's bytes, viewed in place in the region (decoding copies them once)."""
        data = self._slice("input", name, ref)
        expected = _expected_bytes(datatype, shape)
        if expected is not None and expected != ref.byte_size:
            raise InvalidInput(
                f"input {name!r}: shared memory region {ref.region!r} gives {ref.byte_size} "
                f"bytes, expected {expected} for shape {list(shape)} of {datatype}"
            )
        raw = bytes(data) if datatype == "BYTES" else data
        return WireTensor(name=name, datatype=datatype, shape=list(shape), raw=raw)  # type: ignore

    def output_refs(
        self, requested: Iterable[tuple[str, Mapping[str, Any]]]
    ) -> dict[str, TensorRef]:
        """Requested outputs that go to shared memory, checked against their regions before the
        request runs."""
        refs = {}
        for name, params in requested:
            ref = tensor_ref("output", name, params)
            if ref is not None:
                self._slice("output", name, ref)
                refs[name] = ref
        return refs

    def write_outputs(
        self, outputs: Mapping[str, np.ndarray], refs: Mapping[str, TensorRef]
    ) -> None:
        """Copy each output into its region slice (all sizes are checked before any write)."""
        data = {}
        for name, ref in refs.items():
            if name not in outputs:
                continue
            raw = _raw(np.asarray(outputs[name]))
            if len(raw) > ref.byte_size:
                raise InvalidInput(
                    f"output {name!r}: {len(raw)} bytes do not fit the {ref.byte_size} bytes "
                    f"given in shared memory region {ref.region!r} (offset {ref.offset})"
                )
            data[name] = raw
        for name, raw in data.items():
            self._slice("output", name, refs[name])[: len(raw)] = raw

    def _path(self, name: str, key: str) -> Path:
        """``/dev/shm/<key>``: a key is one file name (a leading ``/`` as shm_open takes it)."""
        bare = key[1:] if isinstance(key, str) and key.startswith("/") else key
        if (
            not isinstance(bare, str)
            or not bare
            or "/" in bare
            or "\0" in bare
            or bare in (".", "..")
        ):
            raise InvalidInput(
                f"unable to register shared memory region {name!r}: key {key!r} is not a "
                "shared memory object name (like '/input_data')"
            )
        return self.directory / bare
