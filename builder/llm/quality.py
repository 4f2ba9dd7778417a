"""Quality of a decoder-LLM variant against its fp32 variant, from full next-token
distributions (onnxruntime-genai returns the logits of every prompt position after
``append_tokens``, so no second export is needed).

The evaluation text (the builder's own ``eval_text.txt``, about 5 KB of English prose written
for this project, or ``--eval-data FILE``) is tokenized and cut into non-overlapping windows of
``window`` tokens (at most ``max_windows``); each window runs as one prompt. Per position t the
variant predicts token t+1: perplexity = exp(mean negative log-likelihood), mean KL(fp32 ||
variant) of the two next-token distributions, and top-1 agreement (same most likely token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from builder.errors import CalibrationDataError
from common.llm import GenaiModel, SamplingParams

EVAL_TEXT = "eval_text.txt"
WINDOW = 256
MAX_WINDOWS = 4


@dataclass
class EvalText:
    text: str
    description: str


def eval_text(path: Path | None) -> EvalText:
    """``--eval-data FILE`` (UTF-8 text) or the builder's own text."""
    if path is None:
        text = resources.files("builder.llm").joinpath(EVAL_TEXT).read_text(encoding="utf-8")
        return EvalText(text, "the builder's English evaluation text (builder/llm/eval_text.txt)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationDataError(
            f"--eval-data {path}: not a readable UTF-8 text file: {e}"
        ) from e
    if not text.strip():
        raise CalibrationDataError(f"--eval-data {path} is empty")
    return EvalText(text, f"--eval-data {path}")


def token_windows(
    model: GenaiModel, text: str, window: int = WINDOW, max_windows: int = MAX_WINDOWS
) -> list[list[int]]:
    """Non-overlapping windows of ``window`` tokens (the last may be shorter, not under 16)."""
    window = max(2, min(window, model.context_length - 1))
    tokens = model.encode(text)
    out = [tokens[i : i + window] for i in range(0, len(tokens), window)][:max_windows]
    out = [w for w in out if len(w) >= min(16, window)]
    if not out:
        raise CalibrationDataError(
            f"the evaluation text has {len(tokens)} tokens: too short to measure perplexity"
        )
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=False)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def log_probs(model: GenaiModel, windows: list[list[int]]) -> list[np.ndarray]:
    """Per window, [len-1, vocab] log-probabilities of the next token at each position."""
    out = []
    for w in windows:
        generator = model.generator(w, SamplingParams(max_tokens=1, temperature=0.0))
        logits = np.asarray(generator.get_output("logits"))[0, : len(w) - 1]
        out.append(_log_softmax(logits))
        del generator
    return out


@dataclass
class Quality:
    ppl: float
    ppl_ratio: float
    kl_mean: float
    top1_agreement: float
    eval_tokens: int

    def accuracy_loss(self) -> float:
        """Points of loss for the routing policies (manifest ``details.accuracy_loss``): the
        perplexity increase over fp32 in percent."""
        return max(0.0, 100.0 * (self.ppl_ratio - 1.0))


def perplexity(logp: list[np.ndarray], windows: list[list[int]]) -> float:
    nll = [-lp[np.arange(len(lp)), np.asarray(w[1:])] for lp, w in zip(logp, windows, strict=True)]
    return float(math.exp(float(np.concatenate(nll).astype(np.float64).mean())))


def compare(
    reference: list[np.ndarray], candidate: list[np.ndarray], windows: list[list[int]]
) -> Quality:
    """``candidate``'s quality against the fp32 ``reference`` log-probabilities."""
    kl, agree, n = 0.0, 0, 0
    for p, q in zip(reference, candidate, strict=True):
        kl += float((np.exp(p) * (p - q)).sum(dtype=np.float64))
        agree += int((p.argmax(axis=-1) == q.argmax(axis=-1)).sum())
        n += len(p)
    ref_ppl, ppl = perplexity(reference, windows), perplexity(candidate, windows)
    return Quality(
        ppl=ppl,
        ppl_ratio=ppl / ref_ppl,
        kl_mean=max(0.0, kl / n),
        top1_agreement=agree / n,
        eval_tokens=n,
    )
