"""Results kept per CPU class: the classifier, per-class targets, and the index page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.machine import cpu_class, describe
from bench.results import render_index
from bench.run import isa_sentence
from bench.run import main as bench_main
from bench.targets import evaluate

SPR = [
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
]


def _isa_results(flags: list[str], precisions: list[str]) -> dict:
    contenders = [{"precision": p} for p in precisions]
    return {"machine": {"isa_flags": flags}, "engine_level": {"m": {"contenders": contenders}}}


def test_isa_sentence_follows_the_flags() -> None:
    """The precision paragraph says what this CPU has, not the AVX2 story on every host."""
    assert isa_sentence(_isa_results(SPR, ["fp32", "bf16"])) is None
    avx512 = isa_sentence(_isa_results(["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], ["bf16"]))
    assert avx512 is not None
    assert "avx512_vnni but no AMX" in avx512 and "AVX512_BF16" in avx512
    assert "vpmaddubsw" not in avx512 and "not built" not in avx512
    avx2 = isa_sentence(_isa_results(["avx2"], ["fp32", "int8"]))
    assert avx2 is not None
    assert "vpmaddubsw" in avx2 and "bf16 variant is not built" in avx2
    assert "runs emulated" in (isa_sentence(_isa_results(["avx2"], ["bf16"])) or "")
    no_bf16_run = isa_sentence(_isa_results(["avx2", "avx512_vnni", "avx512_bf16"], ["int8"]))
    assert "no bf16 variant was measured" in (no_bf16_run or "")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (SPR, "intel-amx"),
        (["avx2", "amx_bf16"], "intel-amx"),
        (["avx2", "amx_tile"], "intel-amx"),
        (["avx2", "avx512f", "avx512_vnni"], "avx512"),
        (["avx2", "avx512f"], "avx512"),
        (["avx2"], "avx2"),
        (["avx2", "avx_vnni"], "avx2"),
        ([], "avx2"),
    ],
)
def test_cpu_class_from_flags(flags: list[str], expected: str) -> None:
    assert cpu_class(flags) == expected


def _resnet(ratio: float) -> dict:
    fp32 = {
        "precision": "fp32",
        "engine": "onnxruntime",
        "served": True,
        "size_bytes": 4,
        "ratio_to_ort_fp32": {"8": 1.0},
        "throughput": {"8": 10.0},
    }
    int8 = {
        "precision": "int8",
        "engine": "onnxruntime",
        "served": True,
        "size_bytes": 1,
        "ratio_to_ort_fp32": {"8": ratio},
        "throughput": {"8": 10.0 * ratio},
    }
    return {"headline_batch": 8, "contenders": [fp32, int8]}  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "status"), [(["avx2"], "met"), (SPR, "not met")], ids=["avx2", "amx"]
)
def test_resnet_target_depends_on_the_cpu_class(flags: list[str], status: str) -> None:
    results = {"machine": {"isa_flags": flags}, "engine_level": {"resnet50": _resnet(2.0)}}
    row = evaluate(results)[0]
    assert row["target"].startswith("ResNet-50")
    assert row["status"] == status
    assert row["wanted"] == (">= 1.9x" if status == "met" else ">= 5.0x")


def _timed(precision: str, engine: str, served: bool, rounds: list[float]) -> dict:
    thr = sorted(rounds)[len(rounds) // 2]
    return {
        "precision": precision, "engine": engine, "served": served, "size_bytes": 1,
        "manifest_quality": {}, "throughput": {"8": thr}, "throughput_rounds": {"8": rounds},
        "ratio_to_ort_fp32": {"8": round(thr / 10.0, 3)},
    }  # fmt: skip


def _engines(openvino_int8: list[float], openvino_fp32: list[float]) -> dict:
    """ResNet-50 as docs/benchmarks/avx2.md (2026-12-02) measured it: int8 served on ONNX
    Runtime at 1.28x FP32, and OpenVINO, not served, faster on the same file."""
    return {"headline_batch": 8, "contenders": [
        _timed("fp32", "onnxruntime", True, [9.8, 10.0, 10.2]),
        _timed("fp32", "openvino", False, openvino_fp32),
        _timed("int8", "onnxruntime", True, [12.5, 12.8, 13.1]),
        _timed("int8", "openvino", False, openvino_int8),
    ]}  # fmt: skip


def test_bench_flags_a_faster_unserved_engine_and_judges_the_rechecked_one() -> None:
    # OpenVINO leads int8 by +78 % with a 7 % spread: the re-check would serve it
    res = _engines([22.0, 22.8, 23.5], [10.5, 11.0, 11.5])  # fp32: 1.1x, not flagged
    results = {"machine": {"isa_flags": ["avx2"]}, "engine_level": {"resnet50": res}}
    rows = evaluate(results)
    resnet = rows[0]
    assert (resnet["measured"], resnet["status"]) == (2.28, "met")
    assert resnet["how"] == "best served variant: int8 on openvino (after the engine re-check)"
    (flag,) = [r for r in rows if r["status"] == "flagged"]
    assert flag["target"].startswith("resnet50 int8: served engine within 1.2x")
    assert flag["measured"] == pytest.approx(22.8 / 12.8, abs=1e-3)
    assert "openvino 22.8 items/s vs served onnxruntime 12.8" in flag["how"]
    assert "the start-up re-check serves openvino (lead +78%, spread 7%)" in flag["how"]
    assert "judged on the re-checked engine" in flag["why"]
    # the same lead inside a wide spread: still flagged, but the target is judged on the
    # engine that stays served
    res = _engines([12.0, 22.8, 40.0], [10.5, 11.0, 11.5])
    rows = evaluate({"machine": {"isa_flags": ["avx2"]}, "engine_level": {"resnet50": res}})
    assert (rows[0]["measured"], rows[0]["status"]) == (1.28, "not met")
    assert rows[0]["how"] == "best served variant: int8 on onnxruntime"
    (flag,) = [r for r in rows if r["status"] == "flagged"]
    assert "the start-up re-check keeps onnxruntime" in flag["how"]
    # within 1.2x: no flag
    res = _engines([14.0, 15.0, 16.0], [10.5, 11.0, 11.5])
    rows = evaluate({"machine": {"isa_flags": ["avx2"]}, "engine_level": {"resnet50": res}})
    assert [r for r in rows if r["status"] == "flagged"] == []


def test_kserve_serving_targets_from_paths() -> None:
    def path(rps: float, cpu: float = 1.0) -> dict:
        return {c: {"rps": rps, "server_cpu_ms_per_request": cpu} for c in ("1", "4", "16")}

    paths = {"gateway": path(300.0), "kserve": path(100.0), "triton": path(400.0),
             "gateway_triton": path(300.0, 1.1), "echo": path(900.0, 1.0)}  # fmt: skip
    serving = {"variants": {"digits_int8": {"paths": paths, "ratios": {}}}}
    rows = {t["target"]: t for t in evaluate({"machine": {}, "serving": serving})}
    kserve = [t for name, t in rows.items() if "KServe" in name]
    assert [t["measured"] for t in kserve] == [3.0, 3.0]
    assert {t["status"] for t in kserve} == {"met"}
    triton = next(t for name, t in rows.items() if name.startswith("gateway (embedded) / Triton"))
    assert triton["measured"] == 0.75 and triton["status"] == "not met"
    cpu = next(t for name, t in rows.items() if "CPU per forwarded" in name)
    assert cpu["measured"] == 1.1 and cpu["status"] == "met"


def _run(repo: Path, out: Path, name: str) -> None:
    argv = ["--quick", "--models", "tiny", "--no-serving", "--threads", "1",
            "--repository", str(repo), "--json", str(out / f"{name}.json")]  # fmt: skip
    assert bench_main(argv) == 0


def test_one_class_keeps_the_others_and_the_index_lists_all(
    tiny_repository: Path, tmp_path: Path
) -> None:
    out = tmp_path / "benchmarks"
    _run(tiny_repository, out, "intel-amx")
    amx = json.loads((out / "intel-amx.json").read_text())
    amx["machine"].update(cpu_class="intel-amx", cpu_model="Xeon SPR", isa_flags=SPR)
    (out / "intel-amx.json").write_text(json.dumps(amx))
    amx_md = (out / "intel-amx.md").read_text()
    _run(tiny_repository, out, "avx2")
    assert (out / "intel-amx.md").read_text() == amx_md  # the other class is untouched
    assert json.loads((out / "intel-amx.json").read_text()) == amx
    assert (out / "avx2.md").is_file()
    index = (out / "README.md").read_text()
    assert index == render_index(out)
    rows = [line for line in index.splitlines() if line.startswith("| `")]
    # the second run's file carries this host's class (avx2 or avx512 on these AMD hosts)
    here = describe()["cpu_class"]
    assert here != "intel-amx"
    assert [r.split("|")[1].strip() for r in rows] == [f"`{here}`", "`intel-amx`"]
    assert "[intel-amx.md](intel-amx.md)" in rows[1] and "Xeon SPR" in rows[1]
    assert "[avx2.md](avx2.md)" in rows[0]


def test_the_docs_index_matches_the_docs_jsons() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"
    assert (docs / "avx2.json").is_file()
    assert (docs / "README.md").read_text() == render_index(docs)
