"""``make bench`` / ``python -m bench.run [--quick]``: measure, then write the JSON and the doc.

    python -m bench.run [--repository model_repository] [--models resnet50,minilm,digits]
        [--serving digits:int8,resnet50:int8] [--threads 2] [--no-triton] [--rebuild]
        [--json docs/benchmarks/CLASS.json] [--markdown docs/benchmarks/CLASS.md] [--quick]
    python -m bench.run --render docs/benchmarks/CLASS.json [--markdown PATH]

Results go to ``docs/benchmarks/<cpu-class>.json`` + ``.md`` for this host's CPU class
(:func:`bench.machine.cpu_class`), and the folder's index (``README.md``) is regenerated from
every results JSON in it; other classes' files are left alone. ``--quick`` is a smoke run
(digits only, short windows, under 3 minutes) written to ``reports/bench-quick/<class>.*``
unless ``--json`` / ``--markdown`` say otherwise. Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench import machine
from bench.engine_level import EngineWindows
from bench.serving import ServingWindows

DEFAULT_MODELS = ("resnet50", "minilm", "digits")
DEFAULT_SERVING = "digits:int8,resnet50:int8"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", help=f"engine-level models (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--serving", help=f"model:precision list for serving ({DEFAULT_SERVING})")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    p.add_argument(
        "--serving-threads",
        type=int,
        help="engine threads in the serving paths (default: --threads)",
    )
    p.add_argument(
        "--no-triton", action="store_true", help="skip the paths to Triton: (c), (d), (j)-(l)"
    )
    p.add_argument("--no-serving", action="store_true", help="engine level only")
    p.add_argument("--rebuild", action="store_true", help="call the builder even if built")
    p.add_argument("--quick", action="store_true", help="smoke run: digits, short windows")
    p.add_argument("--json", type=Path, help="raw results (default docs/benchmarks/CLASS.json)")
    p.add_argument("--markdown", type=Path, help="the report (default: the JSON's .md)")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: write the markdown again from a results JSON",
    )
    return p


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _windows(quick: bool) -> tuple[EngineWindows, ServingWindows]:
    if quick:
        return (
            EngineWindows(rounds=2, latency_runs=10, latency_seconds=0.3, throughput_runs=2,
                          throughput_seconds=0.3),
            ServingWindows(rounds=1, concurrencies=(1, 4, 16), seconds=1.0, warmup=0.3,
                           ceiling_concurrencies=(1, 4, 16), ceiling_seconds=1.0),
        )  # fmt: skip
    return EngineWindows(), ServingWindows()


# Opt-in precisions the engine level measures beyond a model's defaults (built when missing):
# MiniLM's int4 next to FP32 and int8-dynamic at batch 1 and 16.
EXTRA_PRECISIONS: dict[str, tuple[str, ...]] = {"minilm": ("int4",)}


def _missing_extras(repository: Path, name: str) -> list[str]:
    from common.model_repository import load_manifest, manifest_path

    extras = EXTRA_PRECISIONS.get(name, ())
    mpath = manifest_path(repository, name)
    have = load_manifest(mpath).variants if extras and mpath.exists() else {}
    return [p for p in extras if p not in have or not (repository / have[p].file).is_file()]


def ensure_built(repository: Path, models: list[str], rebuild: bool) -> dict[str, str]:
    """Build what is missing (the builder keeps existing variants); returns what was done."""
    from common.model_repository import load_manifest, manifest_path

    done = {}
    for name in models:
        mpath = manifest_path(repository, name)
        samples = repository / f"{name}.samples.npz"
        if not rebuild and mpath.exists() and samples.exists():
            m = load_manifest(mpath)
            if m.variants and all((repository / v.file).is_file() for v in m.variants.values()):
                done[name] = "reused"
        t0 = time.perf_counter()
        if name not in done:
            from builder.pipeline import BuildOptions, build_model

            _log(f"building {name} into {repository} (existing variants are kept)")
            build_model(name, BuildOptions(repository=repository, progress=False))
            done[name] = f"built in {time.perf_counter() - t0:.0f}s"
        extras = _missing_extras(repository, name)
        if extras:
            from builder.pipeline import BuildOptions, build_model

            _log(f"building {name} {','.join(extras)} (opt-in precisions the bench measures)")
            build_model(
                name, BuildOptions(repository=repository, precisions=extras, progress=False)
            )
            done[name] += f"; {','.join(extras)} built in {time.perf_counter() - t0:.0f}s"
    return done


def auto_pick(repository: Path, model: str) -> str | None:
    """The precision the gateway's ``auto`` routing policy picks from the manifest."""
    try:
        from server.catalog import load_repository
        from server.routing.policies import AutoPolicy, ModelRoute

        repo = load_repository(repository)
        policy = AutoPolicy(repo.models[model], ModelRoute(policy="auto"))
        # e.g. fp32 because the figures were measured on synthetic data (server/routing/evidence.py)
        return f"{policy.precision} ({policy.reason})" if policy.reason else policy.precision
    except Exception as e:
        return f"(could not decide: {e})"


def run_engine_level(
    repository: Path, models: list[str], threads: int, windows: EngineWindows, quick: bool
) -> dict[str, Any]:
    from bench.engine_level import measure_model

    out: dict[str, Any] = {}
    for name in models:
        _log(f"engine level: {name}")
        try:
            out[name] = measure_model(repository, name, threads, windows, quick, log=_log)
            out[name]["auto_pick"] = auto_pick(repository, name)
        except Exception as e:
            out[name] = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:400]}
            _log(f"engine level: {name} failed: {out[name]['error']}")
    return out


def run_profiles(repository: Path, engine: dict[str, Any], threads: int) -> dict[str, Any]:
    """ONNX Runtime's profiler on the variants the precision targets compare."""
    from bench.engine_level import load_samples, rows
    from bench.profiling import ort_op_profile
    from common.model_repository import load_manifest, manifest_path

    out: dict[str, Any] = {}
    plan = {"resnet50": ("fp32", "int8"), "minilm": ("fp32", "int8-dynamic")}
    for model, precisions in plan.items():
        if model not in engine or "error" in engine[model]:
            continue
        manifest = load_manifest(manifest_path(repository, model))
        feeds = rows(load_samples(repository, model), engine[model]["headline_batch"])
        for p in precisions:
            v = manifest.variants.get(p)
            if v is None:
                continue
            key = f"{v.triton_name} on onnxruntime, batch {engine[model]['headline_batch']}"
            try:
                out[key] = ort_op_profile(repository / v.file, feeds, threads, runs=2)
            except Exception as e:
                out[key] = {"error": " ".join(str(e).split())[:300]}
    return out


def isa_sentence(results: dict[str, Any]) -> str | None:
    """What this CPU's instructions allow INT8 and BF16, from its flags and the variants measured
    (None on AMX hosts: the targets there assume what the CPU has)."""
    flags = set(results["machine"]["isa_flags"])
    if machine.cpu_class(flags) == "intel-amx":
        return None
    engines = results.get("engine_level", {})
    bf16 = any(
        c.get("precision") == "bf16"
        for m in engines.values()
        if isinstance(m, dict)
        for c in m.get("contenders", [])
    )
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni"})
    if vnni:
        int8 = (
            f"This CPU has {', '.join(vnni)} but no AMX: INT8 convolutions and MatMuls run on "
            "VNNI dot products (u8 x s8 into int32 in one instruction, no saturation), a large "
            "step over AVX2 but without AMX's tiles"
        )
    else:
        int8 = (
            "This CPU has neither AVX512-VNNI/AVX-VNNI nor AMX: INT8 convolutions and MatMuls "
            "run on AVX2 (u8 x s8 via vpmaddubsw, with 7-bit weights to avoid its saturation), "
            "which gains far less over FP32 than VNNI/AMX-INT8 does"
        )
    if "avx512_bf16" in flags:
        bf = "BF16 runs on AVX512_BF16 dot products (no AMX-BF16)" + (
            "" if bf16 else "; no bf16 variant was measured in this run"
        )
    else:
        bf = "there is no BF16 arithmetic (" + (
            "the bf16 variant runs emulated)" if bf16 else "the bf16 variant is not built)"
        )
    return (
        f"**Precision targets.** {int8}; {bf}. The profiles above show where each engine's "
        "time goes."
    )


def analysis(results: dict[str, Any]) -> list[str]:
    """Sentences on what bounds the missed figures, built from the measured numbers only."""
    out = []
    isa = isa_sentence(results)
    if isa:
        out.append(isa)
    ops = results.get("profiles", {}).get("onnxruntime_ops", {})
    for fp32_key in [k for k in ops if "_fp32 " in k]:
        model = fp32_key.split("_")[0]
        other = next((k for k in ops if k != fp32_key and k.split("_")[0] == model), None)
        a, b = ops[fp32_key], ops.get(other or "", {})
        if a.get("kernel_ms_per_run") and b.get("kernel_ms_per_run"):
            ratio = a["kernel_ms_per_run"] / b["kernel_ms_per_run"]
            out.append(
                f"ONNX Runtime's profiler: `{other}` spends {b['kernel_ms_per_run']:.1f} ms in "
                f"kernels per run against {a['kernel_ms_per_run']:.1f} ms for `{fp32_key}` "
                f"({ratio:.2f}x); the largest operator is {b['top_ops'][0]['op']} "
                f"({100 * (b['top_ops'][0]['share'] or 0):.0f} % of kernel time) against "
                f"{a['top_ops'][0]['op']} ({100 * (a['top_ops'][0]['share'] or 0):.0f} %): "
                "the compute kernels "
                "themselves, not overheads around them, bound the INT8 speed-up on this CPU."
            )
    ceiling = results.get("serving", {}).get("ceiling", {})
    best = ceiling.get("best") if ceiling else None
    if best and best.get("gateway_cpu_ms_per_request"):
        per = best["gateway_cpu_ms_per_request"]
        out.append(
            f"**Gateway ceiling.** At the ceiling the gateway process spends {per:.3f} ms of CPU "
            f"per request (engine run included) and the client {best['client_cpu_ms_per_request']}"
            f" ms; with client and gateway on the same {results['machine']['cores']} cores, "
            f"{results['machine']['cores']} / (gateway + client CPU per request) bounds the rate."
        )
    return out


def _finite(x: Any) -> Any:
    """NaN (no samples) becomes null: the JSON stays standard."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def render_saved(json_path: Path, md_path: Path | None) -> int:
    """``--render``: judge the saved measurements again and write the markdown and the index."""
    from bench.report import render
    from bench.results import write_index
    from bench.targets import evaluate

    md_path = md_path or json_path.with_suffix(".md")
    try:
        saved = json.loads(json_path.read_text())
        saved["targets"] = evaluate(saved)  # judged again from the saved measurements
        saved["analysis"] = analysis(saved)
        md_path.write_text(render(saved))
        json_path.write_text(json.dumps(_finite(saved), indent=1, default=str) + "\n")
        write_index(json_path.parent)
    except (OSError, ValueError, KeyError) as e:
        print(f"bench: error: cannot render {json_path}: {e}", file=sys.stderr)
        return 2
    _log(f"wrote {md_path} and {json_path.parent / 'README.md'} from {json_path}")
    return 0


@dataclasses.dataclass
class Plan:
    """What one run measures and where it writes (from the command line and the host)."""

    repository: Path
    json_path: Path
    md_path: Path
    models: list[str]
    serving: list[tuple[str, str]]
    threads: int
    serving_threads: int
    quick: bool
    with_triton: bool
    with_serving: bool
    rebuild: bool


def make_plan(args: argparse.Namespace, cpu_class: str) -> Plan:
    from bench.results import default_paths

    quick = args.quick
    json_default, md_default = default_paths(cpu_class, quick)
    models = (args.models.split(",") if args.models else None) or (
        ["digits"] if quick else list(DEFAULT_MODELS)
    )
    spec = args.serving or ("digits:int8" if quick else DEFAULT_SERVING)
    serving = [tuple(s.split(":", 1)) for s in spec.split(",") if s]
    if any(len(s) != 2 for s in serving):
        raise ValueError(f"--serving wants model:precision items, got {spec!r}")
    return Plan(
        repository=args.repository,
        json_path=args.json or json_default,
        md_path=args.markdown or (args.json.with_suffix(".md") if args.json else md_default),
        models=models,
        serving=[(m, p) for m, p in serving],
        threads=args.threads,
        serving_threads=args.serving_threads if args.serving_threads is not None else args.threads,
        quick=quick,
        with_triton=not args.no_triton,
        with_serving=not args.no_serving and bool(serving),
        rebuild=args.rebuild,
    )


def _settings(plan: Plan, built: dict[str, str]) -> dict[str, Any]:
    engine_w, serving_w = _windows(plan.quick)
    return {
        "quick": plan.quick,
        "repository": str(plan.repository),
        "json": str(plan.json_path),
        "threads": plan.threads,
        "serving_threads": plan.serving_threads,
        "models": plan.models,
        "serving": [f"{m}:{p}" for m, p in plan.serving],
        "engine_windows": dataclasses.asdict(engine_w),
        "serving_windows": dataclasses.asdict(serving_w),
        "build": built,
    }


def run_serving(plan: Plan, windows: ServingWindows) -> dict[str, Any]:
    """Section 2 and 3 (``serving``), or ``serving_error`` when the measurement broke."""
    from bench.serving import measure_serving

    _log(f"serving: {', '.join(f'{m}:{p}' for m, p in plan.serving)}")
    ceiling = ("digits", "int8") if ("digits", "int8") in plan.serving else plan.serving[0]
    try:
        return {
            "serving": measure_serving(
                plan.repository,
                plan.serving,
                plan.serving_threads,
                windows,
                with_triton=plan.with_triton,
                ceiling_model=ceiling,
                log=_log,
            )
        }
    except Exception as e:
        error = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        _log(f"serving failed: {error}")
        return {"serving": {}, "serving_error": error}


def measure(plan: Plan, info: dict[str, Any], built: dict[str, str], command: str) -> dict:
    engine_w, serving_w = _windows(plan.quick)
    results: dict[str, Any] = {
        "command": command,
        "machine": info,
        "settings": _settings(plan, built),
    }
    results["engine_level"] = run_engine_level(
        plan.repository, plan.models, plan.threads, engine_w, plan.quick
    )
    if plan.with_serving:
        results.update(run_serving(plan, serving_w))
    _log("profiles")
    results["profiles"] = {
        "onnxruntime_ops": run_profiles(plan.repository, results["engine_level"], plan.threads),
        "py_spy": None
        if results.get("serving", {}).get("py_spy")
        else "py-spy did not sample the serving processes in this run (not installed, or no "
        "serving section); the gateway's own timing histograms and CPU time per request stand in.",
    }
    return results


def write_results(results: dict[str, Any], plan: Plan) -> None:
    """The JSON and markdown of this class, then the index of the folder (others untouched)."""
    from bench.report import render
    from bench.results import write_index
    from bench.targets import evaluate

    results["targets"] = evaluate(results)
    results["analysis"] = analysis(results)
    results["machine"]["load_average_end"] = machine.load_average()
    plan.json_path.parent.mkdir(parents=True, exist_ok=True)
    plan.json_path.write_text(json.dumps(_finite(results), indent=1, default=str) + "\n")
    plan.md_path.parent.mkdir(parents=True, exist_ok=True)
    plan.md_path.write_text(render(results))
    write_index(plan.json_path.parent)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        return render_saved(args.render, args.markdown)
    started = time.perf_counter()
    info = machine.describe()
    try:
        plan = make_plan(args, info["cpu_class"])
    except ValueError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    _log(
        f"bench on {info['cpu_model']} ({info['cpu_class']}), {info['cores']} cores, "
        f"load {info['load_average_start']}"
    )
    try:
        serving_models = [m for m, _ in plan.serving] if plan.with_serving else []
        needed = list(dict.fromkeys([*plan.models, *serving_models]))
        built = ensure_built(plan.repository, needed, plan.rebuild)
    except Exception as e:
        print(f"bench: error: build failed: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return 2
    cli = shlex.join(sys.argv[1:] if argv is None else argv)
    results = measure(plan, info, built, " ".join(["python -m bench.run", cli]).strip())
    results["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    write_results(results, plan)
    _log(f"wrote {plan.md_path} and {plan.json_path} in {results['elapsed_seconds'] / 60:.1f} min")
    for t in results["targets"]:
        _log(f"target {t['status']:>12}: {t['target']}: {t['measured']} (wanted {t['wanted']})")
    failed = failures(results)
    if failed:
        print(f"bench: error: {len(failed)} part(s) failed: {'; '.join(failed)[:400]}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def failures(results: dict[str, Any]) -> list[str]:
    """Parts that could not be measured or answered wrongly (the report still says which)."""
    out = [f"{m}: {r['error']}" for m, r in results.get("engine_level", {}).items() if "error" in r]
    if results.get("serving_error"):
        out.append(f"serving: {results['serving_error']}")
    serving = results.get("serving", {})
    for path, why in serving.get("path_errors", {}).items():
        if not why.startswith(("skipped", "not available")):
            out.append(f"{path}: {why}")
    for name, v in serving.get("variants", {}).items():
        for path, check in v.get("answer_checks", {}).items():
            if not check.get("ok"):
                out.append(f"{name} via {path}: wrong answer ({check.get('error', check)})")
    return out


if __name__ == "__main__":
    sys.exit(main())
