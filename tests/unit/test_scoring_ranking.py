from __future__ import annotations

import math

import choix
import numpy as np
import pytest
from scipy.stats import spearmanr

from cj_assessment.pair_generation import (
    AbilityEstimates,
    PairingHistory,
    PairingStrategy,
    generate_pairs,
)
from cj_assessment.scoring_ranking import (
    MAX_STANDARD_ERROR,
    EssayScore,
    Judgement,
    ScoringResult,
    scale_separation_reliability,
    score_comparisons,
    score_judgements,
)


def _ids(n: int) -> list[str]:
    return [f"essay-{k:04d}" for k in range(n)]


def _simulate_outcomes(
    ids: list[str],
    abilities: np.ndarray,
    rng: np.random.Generator,
    comparisons_per_essay: int,
) -> list[tuple[str, str]]:
    """Judge rounds of random pairings with P(i beats j) = sigmoid(θ_i − θ_j)."""
    index = {essay_id: k for k, essay_id in enumerate(ids)}
    pairs = generate_pairs(
        ids,
        PairingHistory.empty(),
        rng,
        matchings=comparisons_per_essay,
        max_pairs=len(ids) * comparisons_per_essay // 2,
    )
    outcomes = []
    for essay_a, essay_b in pairs:
        difference = abilities[index[essay_a]] - abilities[index[essay_b]]
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-difference))
        outcomes.append((essay_a, essay_b) if a_wins else (essay_b, essay_a))
    return outcomes


def _simulated_batch(
    seed: int, n: int = 30, comparisons_per_essay: int = 15, spread: float = 1.5
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    rng = np.random.default_rng(seed)
    ids = _ids(n)
    abilities = rng.normal(0.0, spread, n)
    return ids, abilities, _simulate_outcomes(ids, abilities, rng, comparisons_per_essay)


def _by_id(result: ScoringResult) -> dict[str, EssayScore]:
    return {essay.essay_id: essay for essay in result.essays}


def test_scores_are_mean_centred_over_scored_essays() -> None:
    ids, _, outcomes = _simulated_batch(seed=1)

    result = score_comparisons(ids, outcomes)

    assert sum(result.scores().values()) == pytest.approx(0.0, abs=1e-9)


def test_ranks_run_from_one_to_n_in_order_of_decreasing_score() -> None:
    ids, _, outcomes = _simulated_batch(seed=2)

    result = score_comparisons(ids, outcomes)

    assert [essay.rank for essay in result.essays] == list(range(1, len(ids) + 1))
    scores = [essay.score for essay in result.essays]
    assert scores == sorted(scores, reverse=True)
    assert sorted(result.scores()) == sorted(ids)


def test_wins_losses_and_comparison_counts_are_tallied_per_essay() -> None:
    outcomes = [("a", "b"), ("a", "c"), ("c", "b"), ("b", "a")]

    essays = _by_id(score_comparisons(["a", "b", "c"], outcomes))

    assert (essays["a"].wins, essays["a"].losses, essays["a"].comparison_count) == (2, 1, 3)
    assert (essays["b"].wins, essays["b"].losses, essays["b"].comparison_count) == (1, 2, 3)
    assert (essays["c"].wins, essays["c"].losses, essays["c"].comparison_count) == (1, 1, 2)


def test_scores_match_choix_map_estimate_with_gaussian_prior() -> None:
    ids, _, outcomes = _simulated_batch(seed=3, n=12, comparisons_per_essay=6)
    index = {essay_id: k for k, essay_id in enumerate(ids)}
    data = [(index[winner], index[loser]) for winner, loser in outcomes]

    scores = score_comparisons(ids, outcomes, alpha=0.01).scores()
    reference = choix.opt_pairwise(len(ids), data, alpha=0.01, tol=1e-12)

    reference -= reference.mean()
    assert [scores[essay_id] for essay_id in ids] == pytest.approx(reference.tolist(), abs=1e-6)


def test_standard_errors_are_positive_and_finite() -> None:
    ids, _, outcomes = _simulated_batch(seed=4)

    result = score_comparisons(ids, outcomes)

    for essay in result.essays:
        assert 0.0 < essay.standard_error < MAX_STANDARD_ERROR
        assert math.isfinite(essay.standard_error)


def test_standard_errors_shrink_with_more_comparisons() -> None:
    ids, _, outcomes = _simulated_batch(seed=5, comparisons_per_essay=8)

    fewer = _by_id(score_comparisons(ids, outcomes))
    more = _by_id(score_comparisons(ids, outcomes * 4))

    for essay_id in ids:
        assert more[essay_id].standard_error < fewer[essay_id].standard_error


def test_sum_to_zero_standard_errors_are_not_inflated_by_the_prior() -> None:
    ids, _, outcomes = _simulated_batch(seed=6, n=30, comparisons_per_essay=15, spread=0.5)

    result = score_comparisons(ids, outcomes)

    # 15 near-even comparisons give SE ≈ 1/sqrt(15 · 0.25) ≈ 0.52; an unprojected
    # prior ridge would add 1/(n · 2α) ≈ 1.7 to every SE².
    assert all(essay.standard_error < 0.75 for essay in result.essays)


def test_essay_that_wins_every_comparison_stays_finite_and_ranks_first() -> None:
    ids = ["champion", "b", "c", "d"]
    outcomes = [("champion", "b"), ("champion", "c"), ("champion", "d")] * 3
    outcomes += [("b", "c"), ("c", "d"), ("d", "b")]

    result = score_comparisons(ids, outcomes)

    top = result.essays[0]
    assert top.essay_id == "champion"
    assert top.rank == 1
    assert math.isfinite(top.score) and top.score > 0
    assert math.isfinite(top.standard_error) and top.standard_error <= MAX_STANDARD_ERROR
    assert result.essays[-1].score > -top.score


def test_essay_that_loses_every_comparison_stays_finite_and_ranks_last() -> None:
    ids = ["a", "b", "c", "last"]
    outcomes = [("a", "last"), ("b", "last"), ("c", "last"), ("a", "b"), ("b", "c"), ("c", "a")]

    result = score_comparisons(ids, outcomes)

    assert result.essays[-1].essay_id == "last"
    assert math.isfinite(result.essays[-1].score)


def test_same_input_gives_identical_result() -> None:
    ids, _, outcomes = _simulated_batch(seed=7)

    assert score_comparisons(ids, outcomes) == score_comparisons(ids, outcomes)


def test_equal_scores_are_ranked_by_essay_id() -> None:
    outcomes = [("b", "a"), ("a", "c"), ("c", "b")]

    result = score_comparisons(["c", "b", "a"], outcomes)

    assert [essay.essay_id for essay in result.essays] == ["a", "b", "c"]
    assert all(essay.score == pytest.approx(0.0, abs=1e-12) for essay in result.essays)


def test_scores_equal_in_theory_are_ranked_by_essay_id_not_by_their_last_bits() -> None:
    # Two disconnected pairs, each winner beating its loser three times (one always shown as
    # Essay B, the other as Essay A, so the fitted position bias is 0): equal scores in
    # theory, unequal in the last bits of the fit.
    judgements = [("l1", "w1", False), ("w2", "l2", True)] * 3

    result = score_judgements(["w2", "l2", "w1", "l1"], judgements)

    assert [essay.essay_id for essay in result.essays] == ["w1", "w2", "l1", "l2"]


def test_reliability_lies_between_zero_and_one() -> None:
    for seed in range(5):
        ids, _, outcomes = _simulated_batch(seed=seed, comparisons_per_essay=10)

        reliability = score_comparisons(ids, outcomes).reliability

        assert reliability is not None
        assert 0.0 <= reliability <= 1.0


def test_reliability_rises_with_more_comparisons() -> None:
    few: list[float] = []
    many: list[float] = []
    for seed in range(5):
        ids, _, outcomes = _simulated_batch(seed=seed, comparisons_per_essay=20)
        after_four_rounds = score_comparisons(ids, outcomes[: len(ids) * 4 // 2]).reliability
        after_twenty_rounds = score_comparisons(ids, outcomes).reliability
        assert after_four_rounds is not None and after_twenty_rounds is not None
        few.append(after_four_rounds)
        many.append(after_twenty_rounds)

    assert np.mean(many) > np.mean(few) + 0.1
    assert np.mean(many) > 0.75


def test_reliability_is_none_with_fewer_than_three_scored_essays() -> None:
    result = score_comparisons(["a", "b", "unscored"], [("a", "b"), ("a", "b")])

    assert result.reliability is None


def test_reliability_is_none_when_scores_have_no_spread() -> None:
    assert scale_separation_reliability([0.0, 0.0, 0.0], [0.5, 0.5, 0.5]) is None


def test_reliability_is_clipped_at_zero_when_errors_exceed_spread() -> None:
    assert scale_separation_reliability([-0.1, 0.0, 0.1], [1.0, 1.0, 1.0]) == 0.0


def test_essay_without_comparisons_gets_zero_score_capped_error_and_a_rank() -> None:
    outcomes = [("a", "b"), ("b", "c"), ("c", "a")] * 2

    result = score_comparisons(["a", "b", "c", "fresh"], outcomes)

    fresh = _by_id(result)["fresh"]
    assert fresh.score == 0.0
    assert fresh.standard_error == MAX_STANDARD_ERROR
    assert (fresh.comparison_count, fresh.wins, fresh.losses) == (0, 0, 0)
    assert fresh.rank == 4
    assert result.reliability is None


def test_essay_without_comparisons_ranks_between_positive_and_negative_scores() -> None:
    outcomes = [("a", "b"), ("a", "b"), ("b", "a")]

    result = score_comparisons(["a", "b", "fresh"], outcomes)

    assert [essay.essay_id for essay in result.essays] == ["a", "fresh", "b"]


def test_disconnected_comparison_graph_gives_finite_capped_standard_errors() -> None:
    outcomes = [("a", "b"), ("b", "c"), ("c", "a"), ("a", "b")]
    outcomes += [("x", "y"), ("y", "z"), ("z", "x"), ("x", "z")]

    result = score_comparisons(["a", "b", "c", "x", "y", "z"], outcomes)

    for essay in result.essays:
        assert math.isfinite(essay.score)
        assert 0.0 < essay.standard_error <= MAX_STANDARD_ERROR
    assert result.reliability is not None and 0.0 <= result.reliability <= 1.0


def test_no_outcomes_raises_value_error() -> None:
    with pytest.raises(ValueError):
        score_comparisons(["a", "b"], [])


def test_outcome_with_unknown_essay_raises_value_error() -> None:
    with pytest.raises(ValueError):
        score_comparisons(["a", "b"], [("a", "ghost")])


def test_essay_compared_with_itself_raises_value_error() -> None:
    with pytest.raises(ValueError):
        score_comparisons(["a", "b"], [("a", "a")])


def test_duplicate_essay_ids_raise_value_error() -> None:
    with pytest.raises(ValueError):
        score_comparisons(["a", "a", "b"], [("a", "b")])


def test_non_positive_alpha_raises_value_error() -> None:
    with pytest.raises(ValueError):
        score_comparisons(["a", "b"], [("a", "b")], alpha=0.0)


@pytest.mark.parametrize("prior_variance", [0.0, -1.0, math.inf, math.nan])
def test_prior_variance_that_is_not_positive_and_finite_raises_value_error(
    prior_variance: float,
) -> None:
    with pytest.raises(ValueError):
        score_judgements(["a", "b"], [("a", "b", True)], prior_variance=prior_variance)


def test_simulated_judgements_recover_true_ranking() -> None:
    correlations = []
    for seed in range(20):
        ids, abilities, outcomes = _simulated_batch(seed=1000 + seed)
        scores = score_comparisons(ids, outcomes).scores()
        correlation = spearmanr([scores[essay_id] for essay_id in ids], abilities).statistic
        correlations.append(correlation)

    assert float(np.median(correlations)) >= 0.88


def test_two_thousand_essays_with_twenty_thousand_comparisons_score_accurately() -> None:
    rng = np.random.default_rng(42)
    n, m = 2000, 20_000
    ids = _ids(n)
    abilities = rng.normal(0.0, 1.5, n)
    first = rng.integers(0, n, m)
    second = (first + rng.integers(1, n, m)) % n
    first_wins = rng.random(m) < 1.0 / (1.0 + np.exp(-(abilities[first] - abilities[second])))
    outcomes = [
        (ids[a], ids[b]) if won else (ids[b], ids[a])
        for a, b, won in zip(first.tolist(), second.tolist(), first_wins.tolist(), strict=True)
    ]

    result = score_comparisons(ids, outcomes)

    assert result.reliability is not None and result.reliability > 0.7
    scores = result.scores()
    assert spearmanr([scores[essay_id] for essay_id in ids], abilities).statistic > 0.85


# --- judgements with orientation: position bias and calibrated reliability -------------------


def _assessment(
    seed: int,
    *,
    n: int,
    iterations: int,
    matchings: int = 1,
    bias: float = 0.3,
    strategy: PairingStrategy = PairingStrategy.RANDOM,
) -> tuple[list[str], np.ndarray, list[Judgement]]:
    """Run an assessment as the service does: plan an iteration, judge it with
    P(A wins) = sigmoid(θ_A − θ_B + bias), score, and hand the estimates to the next."""
    rng = np.random.default_rng(seed)
    ids = _ids(n)
    abilities = rng.normal(0.0, 1.5, n)
    index = {essay_id: k for k, essay_id in enumerate(ids)}
    planned: list[tuple[str, str]] = []
    judgements: list[Judgement] = []
    estimates = None
    for _ in range(iterations):
        pairs = generate_pairs(
            ids,
            PairingHistory.from_pairs(planned),
            rng,
            matchings=matchings,
            max_pairs=matchings * (n // 2),
            strategy=strategy,
            estimates=estimates,
        )
        planned += pairs
        for essay_a, essay_b in pairs:
            difference = abilities[index[essay_a]] - abilities[index[essay_b]] + bias
            a_won = bool(rng.random() < 1.0 / (1.0 + math.exp(-difference)))
            judgements.append(Judgement(essay_a, essay_b, a_won))
        result = score_judgements(ids, judgements)
        estimates = AbilityEstimates(result.scores(), result.standard_errors())
    return ids, abilities, judgements


def _true_squared_correlation(
    result: ScoringResult, ids: list[str], abilities: np.ndarray
) -> float:
    scores = result.scores()
    return float(np.corrcoef([scores[essay_id] for essay_id in ids], abilities)[0, 1] ** 2)


def test_position_bias_estimate_recovers_the_judges_first_position_advantage() -> None:
    estimates = []
    for seed in range(5):
        ids, _, judgements = _assessment(seed=seed, n=200, iterations=15, bias=0.3)
        bias = score_judgements(ids, judgements).position_bias
        assert bias is not None
        assert bias.a_win_share > 0.5
        assert 0.0 < bias.standard_error < 0.1
        estimates.append(bias.logit)

    # One run's estimate has a standard error of about 0.07; the median of five is tighter.
    assert float(np.median(estimates)) == pytest.approx(0.3, abs=0.1)


def test_a_judge_without_position_preference_gets_a_bias_within_three_errors_of_zero() -> None:
    ids, _, judgements = _assessment(seed=12, n=200, iterations=15, bias=0.0)

    bias = score_judgements(ids, judgements).position_bias

    assert bias is not None
    assert abs(bias.logit) < 3 * bias.standard_error


def test_fitting_position_bias_keeps_essays_mostly_shown_first_from_being_overrated() -> None:
    rng = np.random.default_rng(13)
    n = 60
    ids = _ids(n)
    abilities = rng.normal(0.0, 1.0, n)
    shown_first = set(ids[: n // 2])  # these lean towards Essay A, the others towards B
    judgements = []
    for _ in range(12 * n):
        first, second = rng.choice(n, size=2, replace=False)
        if (ids[first] in shown_first) == (ids[second] in shown_first):
            essay_a, essay_b = (first, second) if rng.random() < 0.5 else (second, first)
        else:
            essay_a, essay_b = (first, second) if ids[first] in shown_first else (second, first)
        a_wins = rng.random() < 1.0 / (
            1.0 + math.exp(-(abilities[essay_a] - abilities[essay_b] + 1.0))
        )
        judgements.append((ids[essay_a], ids[essay_b], bool(a_wins)))
    centred = abilities - abilities.mean()

    def overrating(result: ScoringResult) -> float:
        scores = result.scores()
        errors = [scores[ids[k]] - centred[k] for k in range(n)]
        return float(np.mean(errors[: n // 2]) - np.mean(errors[n // 2 :]))

    fitted = overrating(score_judgements(ids, judgements))
    ignored = overrating(score_judgements(ids, judgements, fit_position_bias=False))

    assert ignored > 0.3
    assert abs(fitted) < 0.15


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_calibrated_reliability_is_honest_under_adaptive_pairing_while_raw_ssr_is_inflated(
    seed: int,
) -> None:
    ids, abilities, judgements = _assessment(
        seed=seed, n=150, iterations=10, strategy=PairingStrategy.ADAPTIVE
    )

    result = score_judgements(ids, judgements)
    truth = _true_squared_correlation(result, ids, abilities)

    assert result.reliability is not None and result.scale_separation_reliability is not None
    assert result.reliability == pytest.approx(truth, abs=0.1)
    assert result.scale_separation_reliability > truth + 0.05


def test_calibrated_reliability_has_no_systematic_error_at_five_comparisons_per_essay() -> None:
    errors = []
    for seed in range(6):
        ids, abilities, judgements = _assessment(seed=200 + seed, n=300, iterations=5)
        result = score_judgements(ids, judgements)
        assert result.reliability is not None
        errors.append(result.reliability - _true_squared_correlation(result, ids, abilities))

    # A single run's true squared correlation itself scatters by about ±0.05 at this budget.
    assert all(abs(error) < 0.1 for error in errors)
    assert float(np.median(errors)) == pytest.approx(0.0, abs=0.05)


def test_reliability_lower_bound_is_below_the_truth_in_most_runs_and_narrows_with_data() -> None:
    bounds: dict[int, list[tuple[float, float, float]]] = {10: [], 20: []}
    for iterations, runs in bounds.items():
        for seed in range(20):
            ids, abilities, judgements = _assessment(
                seed=500 + seed, n=30, iterations=iterations, strategy=PairingStrategy.ADAPTIVE
            )
            result = score_judgements(ids, judgements)
            assert result.reliability is not None and result.reliability_lower_bound is not None
            truth = _true_squared_correlation(result, ids, abilities)
            runs.append((result.reliability, result.reliability_lower_bound, truth))
    for runs in bounds.values():
        estimate, bound, truth = (np.array(column) for column in zip(*runs, strict=True))
        assert np.all(bound <= estimate)
        # One-sided 95% on the spread; the rest of a run's scatter is not in it.
        assert np.mean(bound <= truth) >= 0.85
    gap = {k: np.mean([r - b for r, b, _ in runs]) for k, runs in bounds.items()}
    assert gap[20] < gap[10] / 2


def test_with_the_spread_given_the_reliability_lower_bound_is_the_reliability() -> None:
    ids, _, judgements = _assessment(seed=31, n=60, iterations=6)
    result = score_judgements(ids, judgements, prior_variance=2.25)
    assert result.reliability_lower_bound == result.reliability


def test_a_given_prior_variance_sets_the_spread_of_the_scores_and_their_reliability() -> None:
    ids, _, judgements = _assessment(seed=31, n=60, iterations=6)

    narrow = score_judgements(ids, judgements, prior_variance=0.2)
    wide = score_judgements(ids, judgements, prior_variance=5.0)

    assert narrow.reliability is not None and wide.reliability is not None
    assert np.std(list(narrow.scores().values())) < np.std(list(wide.scores().values()))
    assert narrow.reliability < wide.reliability


def test_empirical_bayes_keeps_an_essay_that_won_its_few_comparisons_moderate() -> None:
    ids, _, judgements = _assessment(seed=25, n=40, iterations=3)

    shrunk = score_judgements(ids, judgements).scores()
    near_flat = score_judgements(ids, judgements, alpha=0.01).scores()

    assert max(map(abs, shrunk.values())) < max(map(abs, near_flat.values()))
    assert max(map(abs, shrunk.values())) < 5.0


def test_judgements_are_scored_identically_from_tuples_or_judgement_records() -> None:
    ids, _, judgements = _assessment(seed=26, n=30, iterations=4)

    from_records = score_judgements(ids, judgements)
    from_tuples = score_judgements(ids, [tuple(j) for j in judgements])

    assert from_records == from_tuples
    assert from_records == score_judgements(ids, judgements)


def test_outcomes_without_orientation_report_no_position_bias() -> None:
    ids, _, outcomes = _simulated_batch(seed=27)

    assert score_comparisons(ids, outcomes).position_bias is None


@pytest.mark.parametrize(
    "judgements",
    [[], [("a", "ghost", True)], [("a", "a", False)]],
)
def test_invalid_judgements_raise_value_error(judgements: list[tuple[str, str, bool]]) -> None:
    with pytest.raises(ValueError):
        score_judgements(["a", "b"], judgements)


def test_expectation_propagations_tilted_moments_match_direct_integration() -> None:
    # One judgement per edge takes a shortcut (a single sigmoid), repeated pairs go through
    # log space, and a cavity hundreds of logits on the losing side would underflow the
    # shortcut: each is checked against the moments integrated on a fine grid.
    from cj_assessment import scoring_ranking

    shown_a = np.array([0, 1, 2, 3, 0, 0, 4, 5])
    shown_b = np.array([1, 2, 3, 4, 2, 2, 5, 0])
    a_won = np.array([True, False, True, False, True, False, True, False])
    edges = scoring_ranking._aggregate_edges(shown_a, shown_b, a_won, 6)
    rng = np.random.default_rng(3)
    cavity_mean = rng.normal(0.0, 2.0, edges.a.size)
    cavity_variance = rng.uniform(0.05, 4.0, edges.a.size)
    single = np.flatnonzero(edges.total == 1.0)
    losing_side = -800.0 * np.where(edges.a_wins[single[0]] > 0, 1.0, -1.0)
    cavity_mean[single[0]] = losing_side
    cavity_variance[single[0]] = 1.0
    assert np.any(edges.total > 1.0)

    mean, variance = scoring_ranking._tilted_moments(edges, cavity_mean, cavity_variance)

    for k in range(edges.a.size):
        spread = math.sqrt(cavity_variance[k])
        x = np.linspace(cavity_mean[k] - 12 * spread, cavity_mean[k] + 12 * spread, 200_001)
        log_density = (
            -0.5 * ((x - cavity_mean[k]) / spread) ** 2
            - edges.a_wins[k] * np.logaddexp(0.0, -x)
            - (edges.total[k] - edges.a_wins[k]) * np.logaddexp(0.0, x)
        )
        density = np.exp(log_density - log_density.max())
        expected_mean = float(np.sum(density * x) / density.sum())
        expected_variance = float(np.sum(density * (x - expected_mean) ** 2) / density.sum())
        assert np.isfinite(mean[k]) and np.isfinite(variance[k])
        assert mean[k] == pytest.approx(expected_mean, abs=1e-6 * max(1.0, spread))
        assert variance[k] == pytest.approx(expected_variance, rel=1e-5)
