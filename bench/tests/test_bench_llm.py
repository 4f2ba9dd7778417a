"""bench.llm without llama.cpp (``make test-lab`` never builds it): what it says when the peer
is missing, the round-robin medians, the report's side-by-side lines, and the index listing
the LLM reports apart from bench.run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.llm import PeerUnavailable, llama_cpp_module, render, round_robin
from bench.results import render_index


def test_missing_llama_cpp_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(PeerUnavailable, match="make bench-llm-tools"):
        llama_cpp_module("avx2", tools=tmp_path)


def test_round_robin_interleaves_and_takes_medians() -> None:
    calls: list[str] = []
    timings = {"a": iter([(9, 9, 1), (1, 2, 8), (3, 4, 8), (2, 8, 8)]), "b": iter([(0, 0, 0)] * 4)}

    def run(name: str):  # type: ignore[no-untyped-def]
        def once() -> tuple[float, float, int]:
            calls.append(name)
            return next(timings[name])

        return once

    out = round_robin({"a": run("a"), "b": run("b")}, rounds=3)
    assert calls == ["a", "b"] * 4  # a warm-up each, then a, b per round
    assert out["a"] == {"ttft_ms": 2, "itl_ms": 4, "decode_tok_s": 250.0, "tokens": 8}
    assert out["b"]["decode_tok_s"] is None  # no time measured: no rate


def _doc() -> dict:
    speed = {
        "ours int8 (onnxruntime-genai, direct)": (900.0, 20.0),
        "ours int4 (onnxruntime-genai, direct)": (600.0, 12.5),
        "ours int8 through the gateway (streamed /v1/completions)": (950.0, 22.0),
        "llama.cpp Q8_0": (500.0, 10.0),
        "llama.cpp Q4_K_M": (400.0, 8.0),
    }
    quality = {
        "int8": {"ppl": 10.1, "kl_mean": 0.004, "top1_agreement": 0.97},
        "int4": {"ppl": 12.6, "kl_mean": 0.34, "top1_agreement": 0.8},
        "llama.cpp Q8_0": {"ppl": 10.09, "kl_mean": 0.001, "top1_agreement": 0.99},
        "llama.cpp Q4_K_M": {"ppl": 10.9, "kl_mean": 0.1, "top1_agreement": 0.9},
    }
    return {
        "kind": "llm",
        "command": "python -m bench.llm",
        "elapsed_seconds": 60,
        "machine": {
            "cpu_class": "avx2",
            "cpu_model": "AMD EPYC",
            "cores": 2,
            "isa_flags": ["avx2"],
            "started_utc": "2026-12-07T10:00:00Z",
            "load_average_start": [1.0],
            "load_average_end": [2.0],
        },
        "settings": {
            "model": "smollm2",
            "prompt_tokens": 128,
            "output_tokens": 64,
            "threads": 2,
            "rounds": 3,
        },
        "results": {
            "speed": {
                k: {"ttft_ms": t, "itl_ms": i, "decode_tok_s": 1000 / i, "tokens": 64}
                for k, (t, i) in speed.items()
            },
            "quality": quality,
            "sizes_mb": {"int8": 259.0, "int4": 86.0},
            "peer": {
                "version": "0.3.36",
                "ggufs": {"Q8_0": {"mb": 145.0}},
                "made_from": "x requantized",
            },
            "eval": {"text": "the builder's text", "window": 256, "windows": 4, "tokens": 1020},
        },
    }


def test_render_puts_ours_and_llama_cpp_side_by_side() -> None:
    text = render(_doc())
    assert "| ours int8 (onnxruntime-genai, direct) | 259.0 | 900 | 20.0 | 50.0 | 64 | 10.100" in (
        text
    )
    assert "| llama.cpp Q8_0 | 145.0 | 500 |" in text
    assert "- our int8 50.0 tok/s, ppl 10.100 vs llama.cpp Q8_0 100.0 tok/s, ppl 10.090: ours " \
        "at 0.50x llama.cpp's decode speed" in text  # fmt: skip
    assert "our int4 80.0 tok/s" in text and "load average [1.0]" in text


def test_index_lists_llm_reports_apart(tmp_path: Path) -> None:
    (tmp_path / "llm-avx2.json").write_text(json.dumps(_doc()))
    (tmp_path / "llm-avx2.md").write_text(render(_doc()))
    index = render_index(tmp_path)
    assert "| no results yet |" in index  # not a bench.run results row
    assert "[avx2](llm-avx2.md)" in index
