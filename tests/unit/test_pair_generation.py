from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cj_assessment.pair_generation import (
    AbilityEstimates,
    PairingHistory,
    PairingStrategy,
    covers_all_pairs,
    generate_pairs,
)

UNLIMITED = 10**9

Pair = tuple[str, str]


@dataclass(frozen=True)
class Call:
    history: list[Pair]
    pairs: list[Pair]
    matchings: int
    max_pairs: int


def _ids(n: int) -> list[str]:
    return [f"essay-{k:03d}" for k in range(n)]


def _estimates(ids: list[str], rng: np.random.Generator) -> AbilityEstimates:
    """Arbitrary estimates: fairness must hold whatever the scores say (ties included)."""
    scores = np.round(rng.normal(0.0, 1.5, len(ids)), 1)
    errors = rng.uniform(0.1, 2.0, len(ids))
    return AbilityEstimates(
        scores=dict(zip(ids, scores.tolist(), strict=True)),
        standard_errors=dict(zip(ids, errors.tolist(), strict=True)),
    )


def _run_calls(
    n: int,
    calls: list[tuple[int, int]],
    seed: int,
    strategy: PairingStrategy = PairingStrategy.RANDOM,
) -> list[Call]:
    """Feed each call's output into the next call's history, as the service does; adaptive
    runs get fresh estimates from the second call on (the first iteration has none)."""
    ids = _ids(n)
    rng = np.random.default_rng(seed)
    planned: list[Pair] = []
    results = []
    for number, (matchings, max_pairs) in enumerate(calls):
        estimates = _estimates(ids, rng) if number > 0 else None
        pairs = generate_pairs(
            ids,
            PairingHistory.from_pairs(planned),
            rng,
            matchings=matchings,
            max_pairs=max_pairs,
            strategy=strategy,
            estimates=estimates,
        )
        results.append(Call(list(planned), pairs, matchings, max_pairs))
        planned += pairs
    return results


def _rounds(n: int, pairs: list[Pair]) -> list[list[Pair]]:
    size = n // 2
    return [pairs[start : start + size] for start in range(0, len(pairs), size)]


def _imbalance(history: PairingHistory, essay_id: str) -> int:
    return history.a_positions.get(essay_id, 0) - history.b_positions.get(essay_id, 0)


def _count(history: PairingHistory, first: str, second: str) -> int:
    return history.pair_counts.get(frozenset((first, second)), 0)


def _call_plans(
    max_matchings: int, max_pairs: int, min_calls: int, max_calls: int
) -> st.SearchStrategy[list[tuple[int, int]]]:
    """Successive `generate_pairs` calls as (matchings, max_pairs or UNLIMITED)."""
    return st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=max_matchings),
            st.one_of(st.just(UNLIMITED), st.integers(min_value=1, max_value=max_pairs)),
        ),
        min_size=min_calls,
        max_size=max_calls,
    )


essay_counts = st.integers(min_value=2, max_value=60)
call_plans = _call_plans(max_matchings=6, max_pairs=80, min_calls=1, max_calls=4)
seeds = st.integers(min_value=0, max_value=2**32 - 1)
property_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
strategies = pytest.mark.parametrize("strategy", list(PairingStrategy))


@strategies
@property_settings
@given(n=essay_counts, calls=call_plans, seed=seeds)
def test_each_round_is_a_matching_with_every_essay_at_most_once(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    for call in _run_calls(n, calls, seed, strategy):
        rounds = _rounds(n, call.pairs)
        assert len(rounds) <= call.matchings
        for round_pairs in rounds:
            essays = [essay for pair in round_pairs for essay in pair]
            assert len(essays) == len(set(essays))
            assert all(essay_a != essay_b for essay_a, essay_b in round_pairs)


@strategies
@property_settings
@given(n=essay_counts, calls=call_plans, seed=seeds)
def test_returns_full_rounds_until_max_pairs_and_never_more(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    for call in _run_calls(n, calls, seed, strategy):
        assert len(call.pairs) == min(call.max_pairs, call.matchings * (n // 2))


@strategies
@property_settings
@given(n=essay_counts, calls=call_plans, seed=seeds)
def test_comparison_counts_differ_by_at_most_one_after_every_call(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    ids = _ids(n)
    for call in _run_calls(n, calls, seed, strategy):
        history = PairingHistory.from_pairs(call.history + call.pairs)
        counts = [history.comparison_counts.get(essay_id, 0) for essay_id in ids]
        assert max(counts) - min(counts) <= 1


@strategies
@property_settings
@given(n=essay_counts, calls=call_plans, seed=seeds)
def test_essay_a_and_essay_b_showings_stay_balanced(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    ids = _ids(n)
    for call in _run_calls(n, calls, seed, strategy):
        history = PairingHistory.from_pairs(call.history + call.pairs)
        assert all(abs(_imbalance(history, essay_id)) <= 2 for essay_id in ids)


@strategies
@property_settings
@given(n=essay_counts, calls=call_plans, seed=seeds)
def test_no_repeated_pair_while_each_essay_has_unseen_partners_in_half_the_round(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    """A round repeats no pair whenever every participant could still meet at least half
    of the other participants for the first time (a partner that leans the same way by
    two or more Essay A showings does not count, as pairing them would unbalance one)."""
    for call in _run_calls(n, calls, seed, strategy):
        planned = list(call.history)
        for round_pairs in _rounds(n, call.pairs):
            before = PairingHistory.from_pairs(planned)
            participants = [essay for pair in round_pairs for essay in pair]

            def usable(first: str, second: str, before: PairingHistory = before) -> bool:
                lean = _imbalance(before, first)
                same_heavy_lean = abs(lean) >= 2 and lean == _imbalance(before, second)
                return _count(before, first, second) == 0 and not same_heavy_lean

            if all(
                2 * sum(usable(essay, other) for other in participants if other != essay)
                >= len(participants)
                for essay in participants
            ):
                assert all(_count(before, *pair) == 0 for pair in round_pairs)
            planned += round_pairs


@strategies
@property_settings
@given(n=essay_counts, calls=call_plans, seed=seeds)
def test_repeated_pair_cannot_be_swapped_for_less_repeated_pairs(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    for call in _run_calls(n, calls, seed, strategy):
        planned = list(call.history)
        for round_pairs in _rounds(n, call.pairs):
            before = PairingHistory.from_pairs(planned)
            for (a, b), (c, d) in itertools.permutations(round_pairs, 2):
                if _count(before, a, b) == 0:
                    continue
                if any(abs(_imbalance(before, essay)) >= 2 for essay in (a, b, c, d)):
                    continue
                current = _count(before, a, b) + _count(before, c, d)
                assert _count(before, a, c) + _count(before, b, d) >= current
                assert _count(before, a, d) + _count(before, b, c) >= current
            planned += round_pairs


def _perfect_matchings(essays: list[str]) -> list[list[Pair]]:
    if not essays:
        return [[]]
    first, rest = essays[0], essays[1:]
    return [
        [(first, partner), *matching]
        for position, partner in enumerate(rest)
        for matching in _perfect_matchings(rest[:position] + rest[position + 1 :])
    ]


def _balanced(history: PairingHistory, first: str, second: str) -> bool:
    """Whether the pair can be shown without an essay leaning three showings one way."""
    lean = _imbalance(history, first)
    return not (abs(lean) >= 2 and lean == _imbalance(history, second))


def _rounds_with_their_histories(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> Iterator[tuple[PairingHistory, list[Pair]]]:
    for call in _run_calls(n, calls, seed, strategy):
        planned = list(call.history)
        for round_pairs in _rounds(n, call.pairs):
            yield PairingHistory.from_pairs(planned), round_pairs
            planned += round_pairs


small_essay_counts = st.integers(min_value=4, max_value=9)
long_call_plans = _call_plans(max_matchings=8, max_pairs=30, min_calls=2, max_calls=5)


@strategies
@property_settings
@given(n=small_essay_counts, calls=long_call_plans, seed=seeds)
def test_no_round_repeats_a_pair_when_a_repeat_free_matching_of_its_essays_exists(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    """Checked against every perfect matching of the round's essays (brute force), leaving
    out pairs that would push an essay to three more showings on one side."""
    for before, round_pairs in _rounds_with_their_histories(n, calls, seed, strategy):
        if all(_count(before, *pair) == 0 for pair in round_pairs):
            continue
        participants = [essay for pair in round_pairs for essay in pair]
        assert not any(
            all(_count(before, *pair) == 0 and _balanced(before, *pair) for pair in matching)
            for matching in _perfect_matchings(participants)
        ), f"{round_pairs} repeats a pair though a repeat-free matching exists"


@strategies
@property_settings
@given(n=small_essay_counts, calls=long_call_plans, seed=seeds)
def test_a_round_repeats_only_pairs_planned_as_rarely_as_its_essays_allow(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    """The round's most planned pair was planned no more often than the most planned pair
    of any other perfect matching of its essays (that keeps every essay within balance)."""
    for before, round_pairs in _rounds_with_their_histories(n, calls, seed, strategy):
        participants = [essay for pair in round_pairs for essay in pair]
        least = min(
            (
                max(_count(before, *pair) for pair in matching)
                for matching in _perfect_matchings(participants)
                if all(_balanced(before, *pair) for pair in matching)
            ),
            default=None,
        )
        if least is not None:
            assert max(_count(before, *pair) for pair in round_pairs) <= least


@strategies
@property_settings
@given(
    n=st.integers(min_value=3, max_value=4),
    calls=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=8),
            st.one_of(st.just(UNLIMITED), st.integers(min_value=1, max_value=10)),
        ),
        min_size=3,
        max_size=12,
    ),
    seed=seeds,
)
def test_repeated_pairs_are_shown_each_way_round_in_turn(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    """A judge's preference for one position cancels out within each pair, while every
    essay stays within two showings of balance between Essay A and Essay B."""
    ids = _ids(n)
    for call in _run_calls(n, calls, seed, strategy):
        shown = Counter(call.history + call.pairs)
        history = PairingHistory.from_pairs(call.history + call.pairs)
        for first, second in itertools.combinations(ids, 2):
            assert abs(shown[(first, second)] - shown[(second, first)]) <= 1
        assert all(abs(_imbalance(history, essay_id)) <= 2 for essay_id in ids)


@property_settings
@given(n=st.integers(min_value=1, max_value=30).map(lambda k: 2 * k + 1), seed=seeds)
def test_odd_essay_count_sits_out_an_essay_with_the_most_comparisons(n: int, seed: int) -> None:
    ids = _ids(n)
    (call,) = _run_calls(n, [(6, UNLIMITED)], seed)
    planned: list[Pair] = []
    for round_pairs in _rounds(n, call.pairs):
        before = PairingHistory.from_pairs(planned)
        (sitter,) = set(ids) - {essay for pair in round_pairs for essay in pair}
        counts = {essay_id: before.comparison_counts.get(essay_id, 0) for essay_id in ids}
        assert counts[sitter] == max(counts.values())
        planned += round_pairs


@strategies
@property_settings
@given(n=essay_counts, calls=call_plans, seed=seeds)
def test_same_seed_and_history_give_same_pairs(
    n: int, calls: list[tuple[int, int]], seed: int, strategy: PairingStrategy
) -> None:
    assert _run_calls(n, calls, seed, strategy) == _run_calls(n, calls, seed, strategy)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=2, max_value=12), seed=seeds)
def test_still_returns_full_rounds_after_every_pair_has_been_seen(n: int, seed: int) -> None:
    ids = _ids(n)
    round_robin = list(itertools.combinations(ids, 2))
    history = PairingHistory.from_pairs(round_robin)
    assert covers_all_pairs(ids, round_robin)

    pairs = generate_pairs(
        ids, history, np.random.default_rng(seed), matchings=3, max_pairs=UNLIMITED
    )

    assert len(pairs) == 3 * (n // 2)


@pytest.mark.parametrize("seed", range(10))
def test_prefers_least_repeated_pairs_once_every_pair_has_been_seen(seed: int) -> None:
    ids = ["a", "b", "c", "d"]
    history = PairingHistory.from_pairs(list(itertools.combinations(ids, 2)) + [("a", "b")] * 3)

    pairs = generate_pairs(ids, history, np.random.default_rng(seed), matchings=1, max_pairs=2)

    assert frozenset("ab") not in {frozenset(pair) for pair in pairs}


@pytest.mark.parametrize("seed", range(10))
def test_rounds_from_empty_history_repeat_nothing_while_partners_are_plentiful(
    seed: int,
) -> None:
    ids = _ids(40)

    pairs = generate_pairs(
        ids, PairingHistory.empty(), np.random.default_rng(seed), matchings=15, max_pairs=UNLIMITED
    )

    assert len({frozenset(pair) for pair in pairs}) == len(pairs) == 15 * 20


def test_max_pairs_cutting_a_round_short_serves_least_compared_essays_first() -> None:
    ids = _ids(10)
    history = PairingHistory.from_pairs([("essay-000", "essay-001"), ("essay-002", "essay-003")])

    pairs = generate_pairs(ids, history, np.random.default_rng(0), matchings=1, max_pairs=3)

    chosen = {essay for pair in pairs for essay in pair}
    assert chosen == set(ids[4:])


def test_essay_behind_on_a_showings_is_shown_as_essay_a() -> None:
    history = PairingHistory.from_pairs([("x", "y"), ("x", "z")])

    pairs = generate_pairs(["x", "y"], history, np.random.default_rng(0), matchings=1, max_pairs=1)

    assert pairs == [("y", "x")]


def test_round_avoids_a_repeat_that_needs_three_pairs_to_change_partners() -> None:
    """Seven essays, first iteration: in the fifth round, exchanging partners between two
    pairs cannot avoid repeating a pair, but a matching of the same six essays exists that
    repeats nothing."""
    ids = _ids(7)

    pairs = generate_pairs(
        ids, PairingHistory.empty(), np.random.default_rng([4, 1]), matchings=5, max_pairs=15
    )

    earlier, last = PairingHistory.from_pairs(pairs[:12]), pairs[12:]
    assert len(last) == 3
    assert all(_count(earlier, *pair) == 0 for pair in last)


def test_repeated_pair_is_shown_the_way_round_it_was_shown_less() -> None:
    # x leans towards Essay B and y towards Essay A, so by their own balance x would be
    # shown as A again; turning the pair round still keeps both within two showings.
    history = PairingHistory.from_pairs(
        [("x", "y"), ("z", "x"), ("w", "x"), ("y", "z"), ("y", "w")]
    )

    pairs = generate_pairs(["x", "y"], history, np.random.default_rng(0), matchings=1, max_pairs=1)

    assert pairs == [("y", "x")]


def test_repeated_pair_keeps_its_orientation_when_turning_it_would_unbalance_an_essay() -> None:
    # y already leads by two A showings; showing it as A once more would make that three.
    history = PairingHistory.from_pairs([("x", "y"), ("y", "z"), ("y", "v"), ("y", "w")])

    pairs = generate_pairs(["x", "y"], history, np.random.default_rng(0), matchings=1, max_pairs=1)

    assert pairs == [("x", "y")]


def test_history_without_ordered_counts_still_plans_full_rounds() -> None:
    ids = _ids(6)
    full = PairingHistory.from_pairs(list(itertools.combinations(ids, 2)))
    unordered = PairingHistory(
        pair_counts=full.pair_counts,
        a_positions=full.a_positions,
        b_positions=full.b_positions,
        comparison_counts=full.comparison_counts,
    )

    pairs = generate_pairs(ids, unordered, np.random.default_rng(0), matchings=2, max_pairs=6)

    assert len(pairs) == 6
    for round_pairs in _rounds(6, pairs):
        assert len({essay for pair in round_pairs for essay in pair}) == 6


@pytest.mark.parametrize(
    ("ids", "max_pairs", "matchings"),
    [(["a", "b"], 0, 1), (["a", "b"], -3, 1), (["a"], 5, 1), ([], 5, 1), (["a", "b"], 5, 0)],
)
def test_returns_no_pairs_without_budget_rounds_or_two_essays(
    ids: list[str], max_pairs: int, matchings: int
) -> None:
    pairs = generate_pairs(
        ids,
        PairingHistory.empty(),
        np.random.default_rng(0),
        matchings=matchings,
        max_pairs=max_pairs,
    )

    assert pairs == []


def test_duplicate_essay_ids_raise_value_error() -> None:
    with pytest.raises(ValueError):
        generate_pairs(
            ["a", "a", "b"],
            PairingHistory.empty(),
            np.random.default_rng(0),
            matchings=1,
            max_pairs=5,
        )


def test_history_counts_pairs_positions_and_comparisons() -> None:
    history = PairingHistory.from_pairs([("a", "b"), ("b", "a"), ("a", "c")])

    assert history.pair_counts == {frozenset("ab"): 2, frozenset("ac"): 1}
    assert history.a_positions == {"a": 2, "b": 1}
    assert history.b_positions == {"b": 1, "a": 1, "c": 1}
    assert history.comparison_counts == {"a": 3, "b": 2, "c": 1}
    assert history.ordered_pair_counts == {("a", "b"): 1, ("b", "a"): 1, ("a", "c"): 1}


def test_empty_history_has_no_counts() -> None:
    history = PairingHistory.empty()

    assert not history.pair_counts and not history.comparison_counts
    assert not history.a_positions and not history.b_positions


def test_history_rejects_an_essay_paired_with_itself() -> None:
    with pytest.raises(ValueError):
        PairingHistory.from_pairs([("a", "a")])


def test_pairs_cover_all_only_when_every_pair_of_listed_essays_is_among_them() -> None:
    ids = ["a", "b", "c"]

    assert not covers_all_pairs(ids, [("a", "b"), ("b", "c")])
    assert not covers_all_pairs(ids, [("a", "b"), ("b", "a"), ("b", "c")])  # a repeat is no pair
    assert covers_all_pairs(ids, [("a", "b"), ("b", "c"), ("c", "a")])
    assert covers_all_pairs(["a", "b"], [("a", "b"), ("c", "a")])


def test_two_thousand_essays_get_five_full_matchings() -> None:
    ids = _ids(2000)
    history = _random_rounds(ids, seed=1, matchings=5)

    pairs = generate_pairs(ids, history, np.random.default_rng(2), matchings=5, max_pairs=UNLIMITED)
    assert len(pairs) == 5 * 1000
    for round_pairs in _rounds(2000, pairs):
        assert len({essay for pair in round_pairs for essay in pair}) == 2000
    unordered = Counter(frozenset(pair) for pair in pairs)
    assert all(history.pair_counts.get(pair, 0) == 0 for pair in unordered)
    assert max(unordered.values()) == 1


# --- adaptive pairing -------------------------------------------------------------------------


def _random_rounds(ids: list[str], *, seed: int, matchings: int) -> PairingHistory:
    """The history after `matchings` full random rounds."""
    return PairingHistory.from_pairs(
        generate_pairs(
            ids,
            PairingHistory.empty(),
            np.random.default_rng(seed),
            matchings=matchings,
            max_pairs=UNLIMITED,
        )
    )


def _spread_estimates(ids: list[str], seed: int) -> AbilityEstimates:
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 1.5, len(ids))
    return AbilityEstimates(
        scores=dict(zip(ids, scores.tolist(), strict=True)),
        standard_errors={essay_id: 0.5 for essay_id in ids},
    )


def _mean_score_gap(pairs: list[Pair], estimates: AbilityEstimates) -> float:
    return float(np.mean([abs(estimates.scores[a] - estimates.scores[b]) for a, b in pairs]))


@pytest.mark.parametrize("seed", range(5))
def test_adaptive_rounds_pair_essays_whose_outcome_is_uncertain(seed: int) -> None:
    ids = _ids(60)
    history = _random_rounds(ids, seed=seed, matchings=3)
    estimates = _spread_estimates(ids, seed)

    def plan(strategy: PairingStrategy) -> list[Pair]:
        return generate_pairs(
            ids,
            history,
            np.random.default_rng(seed + 100),
            matchings=4,
            max_pairs=UNLIMITED,
            strategy=strategy,
            estimates=estimates,
        )

    adaptive, random = plan(PairingStrategy.ADAPTIVE), plan(PairingStrategy.RANDOM)

    assert len(adaptive) == len(random) == 4 * 30
    assert _mean_score_gap(adaptive, estimates) < 0.4 * _mean_score_gap(random, estimates)
    assert not any(history.pair_counts.get(frozenset(pair), 0) for pair in adaptive)


def test_adaptive_pairing_without_estimates_plans_the_random_rounds() -> None:
    ids = _ids(30)
    history = _random_rounds(ids, seed=1, matchings=3)

    def plan(strategy: PairingStrategy) -> list[Pair]:
        return generate_pairs(
            ids, history, np.random.default_rng(2), matchings=2, max_pairs=30, strategy=strategy
        )

    assert plan(PairingStrategy.ADAPTIVE) == plan(PairingStrategy.RANDOM)


def test_adaptive_pairing_stays_random_while_an_essay_has_fewer_than_two_comparisons() -> None:
    ids = _ids(30)
    history = _random_rounds(ids, seed=3, matchings=1)
    estimates = _spread_estimates(ids, 3)

    def plan(strategy: PairingStrategy) -> list[Pair]:
        return generate_pairs(
            ids,
            history,
            np.random.default_rng(4),
            matchings=1,
            max_pairs=15,
            strategy=strategy,
            estimates=estimates,
        )

    assert plan(PairingStrategy.ADAPTIVE) == plan(PairingStrategy.RANDOM)


def test_adaptive_pairing_copes_with_essays_missing_from_the_estimates() -> None:
    ids = _ids(20)
    history = _random_rounds(ids, seed=5, matchings=2)
    partial = AbilityEstimates(
        scores={essay_id: float(k) for k, essay_id in enumerate(ids[:15])},
        standard_errors={essay_id: 0.4 for essay_id in ids[:15]},
    )

    pairs = generate_pairs(
        ids,
        history,
        np.random.default_rng(6),
        matchings=2,
        max_pairs=UNLIMITED,
        strategy=PairingStrategy.ADAPTIVE,
        estimates=partial,
    )

    assert len(pairs) == 20
    for round_pairs in _rounds(20, pairs):
        assert len({essay for pair in round_pairs for essay in pair}) == 20


def test_two_thousand_essays_get_five_full_adaptive_matchings_without_repeats() -> None:
    ids = _ids(2000)
    first = generate_pairs(
        ids, PairingHistory.empty(), np.random.default_rng(1), matchings=5, max_pairs=UNLIMITED
    )
    history = PairingHistory.from_pairs(first)

    pairs = generate_pairs(
        ids,
        history,
        np.random.default_rng(2),
        matchings=5,
        max_pairs=UNLIMITED,
        strategy=PairingStrategy.ADAPTIVE,
        estimates=_spread_estimates(ids, 7),
    )

    assert len(pairs) == 5 * 1000
    for round_pairs in _rounds(2000, pairs):
        assert len({essay for pair in round_pairs for essay in pair}) == 2000
    unordered = Counter(frozenset(pair) for pair in pairs)
    assert all(history.pair_counts.get(pair, 0) == 0 for pair in unordered)
    assert max(unordered.values()) == 1
    after = PairingHistory.from_pairs(first + pairs)
    assert all(abs(_imbalance(after, essay_id)) <= 2 for essay_id in ids)
