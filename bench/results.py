"""Where a run's results go: one JSON + markdown pair per CPU class, and the index page.

``docs/benchmarks/<cpu-class>.json`` and ``.md`` (classes: :data:`bench.machine.CPU_CLASSES`)
hold the latest full run on that class of host; a run on one class never touches another's
files. ``docs/benchmarks/README.md`` is regenerated from every results JSON in the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.targets import evaluate

DOCS_DIR = Path("docs/benchmarks")
QUICK_DIR = Path("reports/bench-quick")
INDEX = "README.md"


def default_paths(cpu_class: str, quick: bool) -> tuple[Path, Path]:
    """The JSON and markdown a run on a host of ``cpu_class`` writes by default."""
    folder = QUICK_DIR if quick else DOCS_DIR
    return folder / f"{cpu_class}.json", folder / f"{cpu_class}.md"


def _entry(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    m = data.get("machine") if isinstance(data, dict) else None
    if not isinstance(m, dict) or data.get("kind") == "llm":
        return None  # not a results file of bench.run (bench.llm's are listed apart)
    status = [t["status"] for t in evaluate(data)]  # judged again: targets change per class
    counts = ", ".join(f"{status.count(s)} {s}" for s in dict.fromkeys(status))
    return {
        "class": m.get("cpu_class", path.stem),
        "md": path.with_suffix(".md").name,
        "json": path.name,
        "cpu": f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores",
        "flags": ", ".join(m.get("isa_flags", [])) or "none of the checked flags",
        "date": str(m.get("started_utc", "?"))[:10],
        "quick": bool(data.get("settings", {}).get("quick")),
        "targets": counts or "none judged",
    }


def render_index(folder: Path) -> str:
    """The index page for every results JSON in ``folder`` (sorted by CPU class)."""
    entries = [e for p in sorted(folder.glob("*.json")) if (e := _entry(p))]
    lines = [
        "# Benchmarks by CPU class",
        "",
        "These machines come in several CPU classes (AMD EPYC with AVX2 only, Intel Sapphire "
        "Rapids with AMX and AVX512); the precision targets and the numbers differ between "
        "them, so every class keeps its own latest run. `make bench` measures the host it runs "
        "on, writes `docs/benchmarks/<class>.md` + `.json` for that host's class (from "
        "`bench.machine.cpu_class`: `intel-amx` when the CPU reports AMX, `avx512` for AVX512 "
        "without AMX, `avx2` otherwise) and regenerates this page from the JSONs here; other "
        "classes' files are left as they are.",
        "",
        "Peers, on every class: KServe's Python `ModelServer` (the `bench` extra, kserve 0.21) "
        "serving the same ONNX files (on ONNX Runtime, whatever engine the gateway runs them "
        "on) as serving path (f), and NVIDIA's perf_analyzer (the C++ "
        "binary from the tritonclient 2.40.0 wheel, in `.cache/bench-tools/`) as a second client "
        "over the same paths; py-spy (also the `bench` extra) profiles the gateway where a "
        "serving target is missed. `make bench-tools` installs all three (and Debian's "
        "`libb64-0d`, and `libcudart.so.12` from the `nvidia-cuda-runtime-cu12` wheel, which "
        "perf_analyzer loads on CPU hosts too); `make bench` runs it first.",
        "",
        "Beside them, the floors: a bare grpc.aio echo (e), and the bare servers of "
        "`lab/floors/bare_server.py`: the same engine behind nothing but parse, run, reply on "
        "grpc.aio (h) and on grpc's sync server (i), a grpc.aio forwarder passing the bytes "
        "to the same Triton (j) and one over Triton's HTTP port on raw sockets (k), the "
        "grpc.aio ones on the gateway's event loop (uvloop). Each missed serving target says "
        "what those reach on the same measure: when none meets it either, no handler on these "
        "gRPC servers does on this host (without batching); when one does, the gateway's own "
        "work is what misses it.",
        "",
        "| CPU class | report | raw results | machine | ISA flags | measured | targets |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        when = e["date"] + (" (quick run)" if e["quick"] else "")
        lines.append(
            f"| `{e['class']}` | [{e['md']}]({e['md']}) | [{e['json']}]({e['json']}) | "
            f"{e['cpu']} | {e['flags']} | {when} | {e['targets']} |"
        )
    if not entries:
        lines.append("| — | no results yet | | | | | |")
    llm = sorted(folder.glob("llm-*.md"))
    if llm:
        lines += [
            "",
            "LLM (`python -m bench.llm`, run by `make bench`): our fp32 / int8 / int4 "
            "SmolLM2-135M (onnxruntime-genai, direct and through the gateway) against llama.cpp "
            "on GGUF Q8_0 / Q4_K_M: tokens/s, TTFT, ITL and perplexity side by side. llama.cpp "
            "comes from `make bench-llm-tools` (llama-cpp-python built from source for this CPU, "
            "15-20 minutes on 2 cores, into `.cache/bench-tools/llama-cpp-<class>`; `make bench` "
            "needs it, `make test` and `make test-lab` do not). Per CPU class: "
            + ", ".join(f"[{p.stem.removeprefix('llm-')}]({p.name})" for p in llm)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def write_index(folder: Path) -> Path:
    path = folder / INDEX
    path.write_text(render_index(folder))
    return path
