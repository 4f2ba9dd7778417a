"""common.llm: sampling parameters and the token stream, on the tiny Llama's genai export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.llm import (
    Chunk,
    ContextLengthError,
    GenaiModel,
    LlmError,
    LlmRequestError,
    SamplingParams,
    stream_text,
)


@pytest.fixture(scope="module")
def model(tiny_llama_genai: Path) -> GenaiModel:
    return GenaiModel(tiny_llama_genai, threads=1)


def run(model: GenaiModel, prompt: str, **params: object) -> list[Chunk]:
    return list(stream_text(model, model.encode(prompt), SamplingParams(**params)))  # type: ignore[arg-type]


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def test_greedy_is_deterministic_and_counts_tokens(model: GenaiModel) -> None:
    first = run(model, "Hello there", max_tokens=12, temperature=0)
    assert first == run(model, "Hello there", max_tokens=12, temperature=0)
    assert sum(c.tokens for c in first) == 12
    assert first[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in first[:-1])
    # the streamed text is the decoded tokens
    assert text(first) == model.decode(model.encode(text(first)))


def test_seed_repeats_sampling_and_another_seed_differs(model: GenaiModel) -> None:
    a = text(run(model, "Once upon", max_tokens=24, temperature=1.0, seed=7))
    assert a == text(run(model, "Once upon", max_tokens=24, temperature=1.0, seed=7))
    others = {text(run(model, "Once upon", max_tokens=24, temperature=1.0, seed=s)) for s in (8, 9)}
    assert others - {a}


def test_stop_string_ends_the_stream_before_it(model: GenaiModel) -> None:
    plain = run(model, "Hello there", max_tokens=30, temperature=1.0, seed=3)
    full = text(plain)
    # a stop string across two tokens' text: its first character must be held back
    i = next(
        i
        for i in range(3, len(plain) - 1)
        if plain[i].text
        and plain[i + 1].text.strip()
        and full.find(plain[i].text[-1] + plain[i + 1].text) == len(text(plain[: i + 1])) - 1
    )
    stop = plain[i].text[-1] + plain[i + 1].text
    cut = full.index(stop)
    chunks = run(
        model, "Hello there", max_tokens=30, temperature=1.0, seed=3, stop=[stop, "never seen"]
    )
    assert text(chunks) == full[:cut]
    assert chunks[-1].finish_reason == "stop"


def test_cancelled_between_tokens(model: GenaiModel) -> None:
    seen: list[int] = []

    def cancelled() -> bool:
        seen.append(1)
        return len(seen) > 3

    chunks = list(stream_text(model, model.encode("Hi"), SamplingParams(max_tokens=50), cancelled))
    assert chunks[-1].finish_reason == "cancelled"
    assert sum(c.tokens for c in chunks) == 3


def test_context_length_is_checked_before_generating(model: GenaiModel) -> None:
    prompt = model.encode("word " * 40)
    with pytest.raises(ContextLengthError, match=r"maximum context length is 256 tokens"):
        list(stream_text(model, prompt, SamplingParams(max_tokens=model.context_length)))


def test_chat_prompt_uses_the_models_template(model: GenaiModel) -> None:
    prompt = model.chat_prompt([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(LlmRequestError, match=r"messages\[0\]\.role"):
        model.chat_prompt([{"role": "wizard", "content": "x"}])
    with pytest.raises(LlmRequestError, match="must not be empty"):
        model.chat_prompt([])


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"),
    ],
)
def test_bad_sampling_parameters_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(LlmRequestError, match=f"'{field}'") as info:
        SamplingParams.from_mapping(values)
    assert info.value.field == field


def test_sampling_parameters_round_trip_json() -> None:
    params = SamplingParams.from_mapping({"max_tokens": 5, "stop": "x", "seed": 3, "extra": 1})
    assert SamplingParams.from_json(params.to_json()) == params
    assert params.stop == ("x",)
    with pytest.raises(LlmRequestError, match="not valid JSON"):
        SamplingParams.from_json("{")


def test_a_folder_without_genai_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LlmError, match=r"genai_config\.json"):
        GenaiModel(tmp_path)
    (tmp_path / "genai_config.json").write_text(json.dumps({"search": {}}))
    with pytest.raises(LlmError, match="no 'model' section"):
        GenaiModel(tmp_path)
