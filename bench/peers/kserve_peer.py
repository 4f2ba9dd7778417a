"""KServe's Python ``ModelServer`` serving variants of the repository (v2 gRPC): the peer the
gateway is measured against.

``python -m bench.peers.kserve_peer --variant digits_int8=R/digits_int8/1/model.onnx
[--variant ...] --threads 1 --ready-file PATH`` loads each ONNX file into ONNX Runtime with
the gateway's session options (``threads`` intra-op threads, 1 inter-op, all graph
optimisations, CPU provider) in a ``kserve.Model`` subclass, serves them with
``kserve.ModelServer`` (gRPC and REST, one worker) bound to 127.0.0.1 on OS-picked ports, and
writes ``{"grpc_port": N, "pid": P}`` to the ready file once gRPC is up. KServe binds ``[::]``
/ ``0.0.0.0`` itself; the subprocess patches both to loopback and learns the gRPC port from
``add_insecure_port``. :class:`KServePeer` runs it for the bench.

The subprocess imports neither ``server`` nor ``tritonclient``: KServe's generated
``grpc_predict_v2_pb2`` and tritonclient's ``service_pb2`` both define ``inference.*`` and
cannot share one protobuf descriptor pool. Needs the ``bench`` extra (``make bench-tools``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bench.peers import PeerError
from lab.floors.ready_server import ReadyFileServer

log = logging.getLogger(__name__)


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("kserve") is not None


def _make_model(name: str, session: Any) -> Any:
    import numpy as np
    from kserve import InferOutput, InferRequest, InferResponse, Model

    class VariantModel(Model):
        """The variant's engine session behind KServe's v2 ``predict``."""

        def __init__(self) -> None:
            super().__init__(name)
            self.session = session
            self.ready = True

        def predict(
            self,
            payload: InferRequest,
            headers: dict[str, str] | None = None,
            response_headers: dict[str, str] | None = None,
        ) -> InferResponse:
            feeds = {i.name: i.as_numpy() for i in payload.inputs}
            outputs = self.session.run(feeds)
            infer_outputs = []
            for key, value in outputs.items():
                arr = np.ascontiguousarray(value)
                out = InferOutput(key, list(arr.shape), _datatype(arr))
                out.set_data_from_numpy(arr, binary_data=True)
                infer_outputs.append(out)
            return InferResponse(payload.id or "", name, infer_outputs, use_binary_outputs=True)

    return VariantModel()


_V2_TYPES = {
    "float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64",
    "int32": "INT32", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL",
}  # fmt: skip


def _datatype(arr: Any) -> str:
    return _V2_TYPES[arr.dtype.name]


class _OrtSession:
    """ONNX Runtime with the options common.engines' onnxruntime engine uses."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self._names = [o.name for o in self._s.get_outputs()]

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return dict(zip(self._names, self._s.run(None, feeds), strict=True))


def _bind_loopback(ready_file: Path) -> None:
    """Patch KServe's gRPC and REST servers to bind 127.0.0.1 (port 0 = OS picks) and write
    the gRPC port to ``ready_file`` once the gRPC server has started."""
    import uvicorn
    from kserve.protocol.grpc import server as grpc_server
    from kserve.protocol.rest import server as rest_server

    real_aio = grpc_server.aio

    class _Server:
        def __init__(self, inner: Any) -> None:
            self._inner, self._port = inner, 0

        def add_insecure_port(self, address: str) -> int:
            self._port = self._inner.add_insecure_port("127.0.0.1:" + address.rsplit(":", 1)[1])
            return self._port

        async def start(self) -> None:
            await self._inner.start()
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"grpc_port": self._port, "pid": os.getpid()}))
            tmp.replace(ready_file)

        def __getattr__(self, item: str) -> Any:
            return getattr(self._inner, item)

    class _Aio:
        def __getattr__(self, item: str) -> Any:
            return getattr(real_aio, item)

        @staticmethod
        def server(*args: Any, **kwargs: Any) -> _Server:
            return _Server(real_aio.server(*args, **kwargs))

    class _Config(uvicorn.Config):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["host"] = "127.0.0.1"
            super().__init__(*args, **kwargs)

    grpc_server.aio = _Aio()
    rest_server.uvicorn.Config = _Config  # type: ignore[misc]


def serve(variants: dict[str, Path], threads: int, ready_file: Path) -> None:
    """Serve each ``name -> ONNX file`` until SIGTERM (KServe's own signal handling)."""
    models = [_make_model(name, _OrtSession(path, threads)) for name, path in variants.items()]
    _bind_loopback(ready_file)
    import kserve

    kserve.ModelServer(http_port=0, grpc_port=0, workers=1).start(models)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers.kserve_peer")
    p.add_argument(
        "--variant", action="append", required=True, metavar="NAME=ONNX_FILE",
        help="a model name and the ONNX file it runs (repeatable)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ready-file", type=Path, required=True)
    a = p.parse_args(argv)
    pairs = [v.split("=", 1) for v in a.variant]
    if any(len(pair) != 2 for pair in pairs):
        p.error("--variant wants NAME=ONNX_FILE")
    serve({name: Path(path) for name, path in pairs}, a.threads, a.ready_file)
    return 0


def variant_file(repository: Path, model: str, precision: str) -> tuple[Path, str]:
    """The ONNX file and Triton name of a built variant (in the calling process). KServe runs
    it on ONNX Runtime whatever engine the gateway chose for it (the builder may have measured
    OpenVINO faster here): the peer is KServe's generic server as a user would set it up."""
    from common.model_repository import load_manifest, manifest_path

    v = load_manifest(manifest_path(repository, model)).variants[precision]
    path = Path(repository) / v.file
    if path.suffix != ".onnx":
        raise PeerError(f"the KServe peer runs ONNX files; {v.triton_name} is {path.name}")
    if v.engine != "onnxruntime":
        log.info("KServe peer: %s runs on ONNX Runtime here (the gateway runs it on %s)",
                 v.triton_name, v.engine)  # fmt: skip
    return path, v.triton_name


class KServePeer(ReadyFileServer):
    """``with KServePeer(repo, [("digits", "int8")]) as k: k.grpc_url``: the peer in a
    subprocess, serving each variant's ONNX file under its Triton name."""

    error = PeerError
    grace = 35.0  # KServe's grace period is 30 s at most

    def __init__(
        self,
        repository: Path,
        wanted: list[tuple[str, str]],
        threads: int = 1,
        timeout: float = 120,
    ) -> None:
        args = ["--threads", str(threads)]
        for model, precision in wanted:
            path, name = variant_file(repository, model, precision)
            args += ["--variant", f"{name}={path}"]
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
        super().__init__("bench.peers.kserve_peer", args, "the KServe peer", timeout, env)

    def __enter__(self) -> KServePeer:
        if not available():
            raise PeerError("kserve is not installed (make bench-tools installs the bench extra)")
        super().__enter__()
        return self


if __name__ == "__main__":
    sys.exit(main())
