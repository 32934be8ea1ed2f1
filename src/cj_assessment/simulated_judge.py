"""A simulated LLM judge for comparative judgement (pure: no I/O, no clock, no global state).

Each essay gets a *latent quality* computed deterministically from its text, and a comparison is
a draw from a Bradley-Terry (logistic) model on the difference of the two latent qualities. That
makes the simulation a known ground truth: a correct CJ pipeline must recover an ordering that
correlates with `latent_quality`, and the noise / position-bias knobs let tests stress it.

The latent quality is a transparent heuristic of writing quality, not a real assessment. It is a
weighted sum of z-scored text features (see `_FEATURES`):

* ``log_words``       log of the word count: developed answers beat two-line ones;
* ``mattr``           moving-average type-token ratio on a 50-word window: lexical diversity that
                      does not shrink just because an essay is long;
* ``word_length``     mean letters per word: a proxy for vocabulary sophistication;
* ``long_words``      share of words with 8+ letters;
* ``sentence_sanity`` minus |log(mean sentence length / 18)|: run-ons and fragments both lose;
* ``connectives``     argument / discourse markers per 100 words ("however", "therefore", ...);
* ``mechanics``       minus the rate of basic slips (lower-case sentence starts, lower-case "i",
                      apostrophe-less contractions, a few frequent misspellings).

The z-score reference means and standard deviations are fixed constants (calibrated once on the
bundled sample essays), so an essay's quality never depends on which other essays are present.
On top of that a small deterministic term from sha256(text) in [-0.3, +0.3] makes essays with
near-identical features still differ, as real essays do.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+")
_SENTENCE_START_RE = re.compile(r"(?:^|[.!?]\s+)([A-Za-z])")
_LOWER_I_RE = re.compile(r"(?<![A-Za-z'])i(?![A-Za-z'])")

_MATTR_WINDOW = 50
_IDEAL_SENTENCE_WORDS = 18.0
_HASH_AMPLITUDE = 0.3

# Discourse markers that signal an argued, structured answer. Multi-word markers are matched as
# phrases on the lower-cased, whitespace-normalised text.
_CONNECTIVES: tuple[str, ...] = (
    "however",
    "therefore",
    "moreover",
    "furthermore",
    "consequently",
    "nevertheless",
    "nonetheless",
    "although",
    "whereas",
    "admittedly",
    "indeed",
    "thus",
    "hence",
    "ultimately",
    "conversely",
    "similarly",
    "in addition",
    "for instance",
    "for example",
    "on the other hand",
    "in contrast",
    "by contrast",
    "in conclusion",
    "to conclude",
    "in summary",
    "to sum up",
    "on balance",
    "of course",
    "firstly",
    "secondly",
    "first,",
    "despite",
    "rather than",
)

# Apostrophe-less contractions and frequent misspellings: cheap evidence of weak mechanics.
_SLIPS: frozenset[str] = frozenset(
    {
        "dont",
        "doesnt",
        "didnt",
        "cant",
        "wont",
        "isnt",
        "wasnt",
        "thats",
        "im",
        "ive",
        "alot",
        "becuase",
        "freind",
        "cought",
        "untill",
        "definately",
        "recieve",
        "wich",
    }
)

# name -> (reference mean, reference standard deviation, weight). Means/SDs were measured on the
# 24 bundled sample essays and rounded; the weights say how much each aspect counts.
_FEATURES: dict[str, tuple[float, float, float]] = {
    "log_words": (5.0, 0.35, 1.0),
    "mattr": (0.83, 0.08, 1.0),
    "word_length": (4.85, 0.55, 1.0),
    "long_words": (0.19, 0.065, 0.75),
    "sentence_sanity": (-0.33, 0.24, 0.5),
    "connectives": (1.1, 1.1, 0.75),
    "mechanics": (-0.015, 0.04, 0.75),
}
# Divides the weighted z-sum so that the bundled samples span roughly -2..+2.
_SCALE = 4.2


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _mattr(lowered: list[str], window: int = _MATTR_WINDOW) -> float:
    """Moving-average type-token ratio; plain TTR when the text is shorter than the window."""
    if not lowered:
        return 0.0
    if len(lowered) <= window:
        return len(set(lowered)) / len(lowered)
    ratios = [
        len(set(lowered[start : start + window])) / window
        for start in range(len(lowered) - window + 1)
    ]
    return sum(ratios) / len(ratios)


def _features(text: str) -> dict[str, float]:
    words = _words(text)
    lowered = [w.lower() for w in words]
    n_words = max(len(words), 1)
    sentences = [s for s in _SENTENCE_SPLIT_RE.split(text.strip()) if _WORD_RE.search(s)]
    n_sentences = max(len(sentences), 1)
    mean_sentence = len(words) / n_sentences if words else 1.0

    flat = " " + " ".join(text.lower().split()) + " "
    connective_hits = sum(
        len(re.findall(r"(?<![a-z])" + re.escape(marker) + r"(?![a-z])", flat))
        for marker in _CONNECTIVES
    )

    starts = _SENTENCE_START_RE.findall(text)
    lower_starts = sum(1 for s in starts if s.islower())
    lower_i = len(_LOWER_I_RE.findall(text))
    slips = sum(1 for w in lowered if w in _SLIPS)
    slip_rate = (lower_starts + lower_i + slips) / n_words

    return {
        "log_words": math.log(n_words),
        "mattr": _mattr(lowered),
        "word_length": sum(len(w) for w in words) / n_words if words else 0.0,
        "long_words": sum(1 for w in words if len(w) >= 8) / n_words,
        "sentence_sanity": -abs(math.log(max(mean_sentence, 1.0) / _IDEAL_SENTENCE_WORDS)),
        "connectives": 100.0 * connective_hits / n_words,
        "mechanics": -slip_rate,
    }


def _hash_jitter(text: str) -> float:
    """A deterministic value in [-0.3, +0.3] from the text's sha256."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / float(2**64 - 1)
    return (2.0 * unit - 1.0) * _HASH_AMPLITUDE


def latent_quality(text: str) -> float:
    """Deterministic latent quality of an essay (higher is better; samples span about -2..+2)."""
    features = _features(text)
    total = 0.0
    for name, (mean, sd, weight) in _FEATURES.items():
        # Clip each z so one extreme feature (say, a 5,000-word essay) cannot dominate.
        z = max(-3.0, min(3.0, (features[name] - mean) / sd))
        total += weight * z
    return total / _SCALE + _hash_jitter(text)


# The same essays meet many times in one assessment; the feature pass is the costly part.
_cached_latent = functools.lru_cache(maxsize=2048)(latent_quality)


@dataclass(frozen=True)
class JudgeVerdict:
    winner: Literal["Essay A", "Essay B"]
    confidence: float  # 1-5
    justification: str


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# Generic reasons, chosen by the draw: they must never quote or paraphrase essay text.
_REASONS: tuple[str, ...] = (
    "presents a clearer, better-organised argument",
    "develops its position with stronger reasoning and support",
    "uses more precise language and a more coherent structure",
    "addresses the task more fully and anticipates objections",
    "shows better control of language and a more convincing line of argument",
)


def judge(
    text_a: str,
    text_b: str,
    rng: np.random.Generator,
    *,
    noise: float = 1.0,
    position_bias: float = 0.0,
) -> JudgeVerdict:
    """One simulated comparison.

    P(Essay A wins) = sigmoid((latent(A) - latent(B) + position_bias) / noise): a Bradley-Terry
    judge whose logistic noise has scale `noise` (larger = less reliable) and who favours the
    first-shown essay by `position_bias` logits. Confidence grows with |p - 0.5|, from 1 (a coin
    flip) to 5 (certain).
    """
    if noise <= 0:
        raise ValueError("noise must be positive")
    p_a = _sigmoid((_cached_latent(text_a) - _cached_latent(text_b) + position_bias) / noise)
    a_wins = bool(rng.random() < p_a)
    winner: Literal["Essay A", "Essay B"] = "Essay A" if a_wins else "Essay B"
    confidence = round(1.0 + 8.0 * abs(p_a - 0.5), 1)  # |p-0.5| in [0, 0.5] -> [1, 5]
    reason = _REASONS[int(rng.integers(len(_REASONS)))]
    # An upset (the less likely essay wins) gets a hedged justification, as a real judge would.
    hedge = "" if (p_a >= 0.5) == a_wins else "On balance, narrowly: "
    justification = f"{hedge}{winner} {reason}."
    return JudgeVerdict(winner=winner, confidence=confidence, justification=justification)
