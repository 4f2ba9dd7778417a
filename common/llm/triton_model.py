"""Triton python-backend model of one decoder-LLM variant (decoupled, streaming).

The builder copies this file as ``<model>_<precision>/1/model.py`` next to the variant's
onnxruntime-genai folder ``1/genai/`` (docs/llm.md). It imports only ``common.llm``, numpy and
the stub's ``triton_python_backend_utils``. Tensors, as Triton's vLLM backend names them (so
``/v2/models/{m}/generate`` takes the JSON users already send):

inputs   ``text_input`` BYTES [1]; optional ``stream`` BOOL [1], ``sampling_parameters``
         BYTES [1] (JSON: max_tokens, temperature, top_p, seed, stop),
         ``exclude_input_in_output`` BOOL [1] (default true)
outputs  ``text_output`` BYTES [1], ``finish_reason`` BYTES [1] ("" until the last response),
         ``num_input_tokens`` UINT32 [1], ``num_output_tokens`` UINT32 [1] (tokens in this
         response's text)

Sampling fields may come as request parameters too (Triton's generate extension puts JSON keys
that are not inputs there); the ``sampling_parameters`` tensor wins where both name a field.
Chat: a ``messages`` request parameter (a JSON string of OpenAI-style messages, as the gateway's
Triton upstream sends for ``/v1/chat/completions``) is rendered with the model's own chat
template and replaces ``text_input``; with ``fit_max_tokens`` true, ``max_tokens`` becomes what
fits the context after the prompt, at most ``FIT_MAX_TOKENS``.
Streaming sends one response per chunk of text, the last one flagged final; otherwise one final
response holds all the text. Each request runs on a thread of its own (at most
``precision_serve_max_sequences`` at once, the rest wait), so ``execute`` returns at once; a
cancelled request stops between two tokens.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from common.llm import Chunk, GenaiModel, LlmRequestError, SamplingParams, stream_text

TEXT_INPUT = "text_input"
STREAM = "stream"
SAMPLING_PARAMETERS = "sampling_parameters"
EXCLUDE_INPUT = "exclude_input_in_output"
TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
NUM_INPUT_TOKENS = "num_input_tokens"
NUM_OUTPUT_TOKENS = "num_output_tokens"
# (name, KServe v2 datatype, optional) of each input and output
INPUTS = (
    (TEXT_INPUT, "BYTES", False),
    (STREAM, "BOOL", True),
    (SAMPLING_PARAMETERS, "BYTES", True),
    (EXCLUDE_INPUT, "BOOL", True),
)
OUTPUTS = (
    (TEXT_OUTPUT, "BYTES"),
    (FINISH_REASON, "BYTES"),
    (NUM_INPUT_TOKENS, "UINT32"),
    (NUM_OUTPUT_TOKENS, "UINT32"),
)

# config.pbtxt parameters (all optional)
PARAM_GENAI_FOLDER = "precision_serve_genai_folder"  # default: <version folder>/genai
PARAM_THREADS = "precision_serve_threads"  # intra-op threads; 0 or absent: ONNX Runtime's
PARAM_MAX_SEQUENCES = "precision_serve_max_sequences"  # requests generating at once
DEFAULT_MAX_SEQUENCES = 4
# request parameters of chat (module docstring)
PARAM_MESSAGES = "messages"
PARAM_FIT_MAX_TOKENS = "fit_max_tokens"
FIT_MAX_TOKENS = 2048  # as the embedded upstream's default limit
GENAI_FOLDER = "genai"


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def genai_folder(args: dict[str, str], params: dict[str, str]) -> Path:
    """The onnxruntime-genai folder: the config's parameter, else ``<version>/genai``."""
    if params.get(PARAM_GENAI_FOLDER):
        return Path(params[PARAM_GENAI_FOLDER])
    return Path(args["model_repository"]) / str(args["model_version"]) / GENAI_FOLDER


def _scalar(tensor: Any) -> Any:
    array = tensor.as_numpy().reshape(-1)
    if array.size != 1:
        raise LlmRequestError(f"input {tensor.name()!r} must hold one element, got {array.size}")
    return array[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LlmRequestError(f"input {name!r} is not UTF-8: {e}", name) from e
    return str(value)


class TritonPythonModel:
    """The class Triton's python backend instantiates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        self._pb = importlib.import_module("triton_python_backend_utils")  # from the stub
        config = json.loads(args["model_config"])
        self._name = config.get("name", "")
        if not self._pb.using_decoupled_model_transaction_policy(config):
            raise ValueError(f"model {self._name!r}: an LLM model must be decoupled")
        params = _parameters(config)
        threads = int(params.get(PARAM_THREADS) or 0)
        self._model = GenaiModel(genai_folder(args, params), threads or None)
        workers = int(params.get(PARAM_MAX_SEQUENCES) or DEFAULT_MAX_SEQUENCES)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix=self._name)

    # -- one request -------------------------------------------------------------------------
    def _request(self, request: Any) -> tuple[str, bool, bool, SamplingParams, bool]:
        pb = self._pb
        text_tensor = pb.get_input_tensor_by_name(request, TEXT_INPUT)
        if text_tensor is None:
            raise LlmRequestError(f"input {TEXT_INPUT!r} is missing", TEXT_INPUT)
        prompt = _text(_scalar(text_tensor), TEXT_INPUT)
        stream_tensor = pb.get_input_tensor_by_name(request, STREAM)
        stream = bool(_scalar(stream_tensor)) if stream_tensor is not None else False
        exclude_tensor = pb.get_input_tensor_by_name(request, EXCLUDE_INPUT)
        exclude = bool(_scalar(exclude_tensor)) if exclude_tensor is not None else True
        try:
            values = json.loads(request.parameters() or "{}")
        except ValueError as e:
            raise LlmRequestError(f"request parameters are not valid JSON: {e}") from e
        values = dict(values) if isinstance(values, dict) else {}
        sampling_tensor = pb.get_input_tensor_by_name(request, SAMPLING_PARAMETERS)
        if sampling_tensor is not None:
            raw = _text(_scalar(sampling_tensor), SAMPLING_PARAMETERS)
            try:
                given = json.loads(raw) if raw.strip() else {}
            except ValueError as e:
                raise LlmRequestError(
                    f"{SAMPLING_PARAMETERS!r} is not valid JSON: {e}", SAMPLING_PARAMETERS
                ) from e
            if not isinstance(given, dict):
                raise LlmRequestError(
                    f"{SAMPLING_PARAMETERS!r} must be a JSON object", SAMPLING_PARAMETERS
                )
            values.update(given)
        messages = values.get(PARAM_MESSAGES)
        if messages is not None:
            try:
                parsed = json.loads(messages) if isinstance(messages, str) else messages
            except ValueError as e:
                raise LlmRequestError(f"'messages' is not valid JSON: {e}", "messages") from e
            if not isinstance(parsed, list):
                raise LlmRequestError("'messages' must be a list", "messages")
            prompt = self._model.chat_prompt(parsed)
        fit = values.get(PARAM_FIT_MAX_TOKENS) is True
        return prompt, stream, exclude, SamplingParams.from_mapping(values), fit

    def _response(self, text: str, finish: str, n_in: int, n_out: int) -> Any:
        pb = self._pb
        tensors = [
            pb.Tensor(TEXT_OUTPUT, np.array([text.encode("utf-8")], dtype=np.object_)),
            pb.Tensor(FINISH_REASON, np.array([finish.encode("utf-8")], dtype=np.object_)),
            pb.Tensor(NUM_INPUT_TOKENS, np.array([n_in], dtype=np.uint32)),
            pb.Tensor(NUM_OUTPUT_TOKENS, np.array([n_out], dtype=np.uint32)),
        ]
        return pb.InferenceResponse(output_tensors=tensors)

    def _error(self, message: str, invalid: bool) -> Any:
        pb = self._pb
        code = pb.TritonError.INVALID_ARG if invalid else pb.TritonError.INTERNAL
        return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, code))

    def _serve(self, request: Any, sender: Any) -> None:
        final = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt, stream, exclude, params, fit = self._request(request)
            tokens = self._model.encode(prompt)
            if fit:
                room = self._model.context_length - len(tokens)
                params = dataclasses.replace(params, max_tokens=max(1, min(FIT_MAX_TOKENS, room)))
            self._model.check_fits(len(tokens), params.max_tokens)
            chunks = stream_text(self._model, tokens, params, sender.is_cancelled)
            prefix = "" if exclude else prompt
            if stream:
                self._stream(chunks, sender, prefix, len(tokens))
            else:
                text, count, reason = [prefix], 0, ""
                for chunk in chunks:
                    text.append(chunk.text)
                    count += chunk.tokens
                    reason = chunk.finish_reason or reason
                if reason == "cancelled":
                    self._cancelled(count)
                    sender.send(flags=final)
                else:
                    sender.send(self._response("".join(text), reason, len(tokens), count), final)
        except LlmRequestError as e:
            sender.send(self._error(f"model {self._name!r}: {e}", True), flags=final)
        except Exception as e:  # the server keeps running; the client gets the reason
            sender.send(self._error(f"model {self._name!r}: {e}", False), flags=final)

    def _stream(self, chunks: Any, sender: Any, prefix: str, n_in: int) -> None:
        """One response per chunk; the last chunk's response carries the final flag."""
        final = self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        pending: Chunk | None = None
        sent = 0
        for chunk in chunks:
            if pending is not None:
                sender.send(self._response(prefix + pending.text, "", n_in, pending.tokens))
                prefix = ""
                sent += pending.tokens
            pending = chunk
        assert pending is not None  # stream_text always ends with a chunk holding the reason
        if pending.finish_reason == "cancelled":
            self._cancelled(sent)
            sender.send(flags=final)
            return
        response = self._response(
            prefix + pending.text, pending.finish_reason or "", n_in, pending.tokens
        )
        sender.send(response, flags=final)

    def _cancelled(self, tokens: int) -> None:
        self._pb.Logger.log_info(
            f"model {self._name!r}: request cancelled by the client after {tokens} tokens"
        )

    # -- Triton's entry points ---------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._pool.submit(self._serve, request, request.get_response_sender())
        return None

    def finalize(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
