"""The simulated judge: a deterministic latent quality and a Bradley-Terry draw on it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cj_assessment.samples import SAMPLE_INSTRUCTIONS, load_sample_essays
from cj_assessment.simulated_judge import JudgeVerdict, judge, latent_quality

# Hand-picked when the samples were written (quality is not in the file names).
EXCELLENT = ["essay_03", "essay_11", "essay_17", "essay_22"]
WEAK = ["essay_04", "essay_07", "essay_10", "essay_13", "essay_18"]


@pytest.fixture(scope="module")
def essays() -> dict[str, str]:
    return load_sample_essays()


def test_samples_are_bundled(essays: dict[str, str]) -> None:
    assert list(essays) == [f"essay_{n:02d}" for n in range(1, 25)]
    for text in essays.values():
        assert 80 <= len(text.split()) <= 300
    assert "project-based learning" in SAMPLE_INSTRUCTIONS


def test_latent_quality_is_deterministic(essays: dict[str, str]) -> None:
    for text in essays.values():
        assert latent_quality(text) == latent_quality(text)
        # A copy of the string (not the same object) gives the same value too.
        assert latent_quality("".join(list(text))) == latent_quality(text)


def test_latent_quality_distinguishes_essays(essays: dict[str, str]) -> None:
    qualities = [latent_quality(text) for text in essays.values()]
    assert len(set(qualities)) == len(qualities)
    assert -3.0 < min(qualities) < -1.5
    assert 1.5 < max(qualities) < 3.0


def test_excellent_essays_beat_weak_ones(essays: dict[str, str]) -> None:
    worst_excellent = min(latent_quality(essays[e]) for e in EXCELLENT)
    best_weak = max(latent_quality(essays[e]) for e in WEAK)
    assert worst_excellent > best_weak + 2.0


def test_much_better_essay_usually_wins(essays: dict[str, str]) -> None:
    rng = np.random.default_rng(7)
    good, bad = essays["essay_22"], essays["essay_04"]
    wins = 0
    for i in range(500):
        # Alternate positions so the rate measures quality, not the slot.
        if i % 2 == 0:
            wins += judge(good, bad, rng).winner == "Essay A"
        else:
            wins += judge(bad, good, rng).winner == "Essay B"
    assert wins / 500 > 0.8


def test_position_bias_raises_essay_a_wins(essays: dict[str, str]) -> None:
    a, b = essays["essay_08"], essays["essay_23"]  # two close mediocre essays

    def a_rate(bias: float) -> float:
        rng = np.random.default_rng(11)
        draws = [judge(a, b, rng, position_bias=bias).winner for _ in range(1000)]
        return draws.count("Essay A") / len(draws)

    assert a_rate(1.5) > a_rate(0.0) + 0.2


def test_noise_flattens_the_judge(essays: dict[str, str]) -> None:
    good, bad = essays["essay_17"], essays["essay_13"]

    def a_rate(noise: float) -> float:
        rng = np.random.default_rng(3)
        draws = [judge(good, bad, rng, noise=noise).winner for _ in range(1000)]
        return draws.count("Essay A") / len(draws)

    assert a_rate(1.0) > a_rate(10.0) > 0.4


def test_verdict_shape_and_no_essay_text(essays: dict[str, str]) -> None:
    rng = np.random.default_rng(5)
    ids = list(essays)
    for i in range(200):
        text_a, text_b = essays[ids[i % 24]], essays[ids[(i * 7 + 3) % 24]]
        verdict = judge(text_a, text_b, rng)
        assert isinstance(verdict, JudgeVerdict)
        assert verdict.winner in ("Essay A", "Essay B")
        assert 1.0 <= verdict.confidence <= 5.0
        assert 0 < len(verdict.justification) <= 500
        # No run of four consecutive essay words appears in the justification.
        just = verdict.justification.lower()
        for text in (text_a, text_b):
            words = re.findall(r"[a-z']+", text.lower())
            for k in range(len(words) - 3):
                assert " ".join(words[k : k + 4]) not in just


def test_confidence_grows_with_the_quality_gap(essays: dict[str, str]) -> None:
    rng = np.random.default_rng(1)
    near = judge(essays["essay_08"], essays["essay_23"], rng).confidence
    far = judge(essays["essay_22"], essays["essay_04"], rng).confidence
    assert far > near


def test_noise_must_be_positive(essays: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        judge(essays["essay_01"], essays["essay_02"], np.random.default_rng(), noise=0.0)
