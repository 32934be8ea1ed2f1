"""Random pair generation for comparative judgement rounds.

Each round is a matching: every essay appears at most once, so comparison counts grow
evenly. Within a round, partners are drawn at random among the essays not yet matched,
preferring pairs never planned before (then the least-repeated ones) and partners whose
Essay A/Essay B imbalance lets both move back towards zero. A greedy pass finds most such
partners by sampling a few random candidates, so a round costs roughly linear time; a
local search then swaps partners between two pairs whenever that lowers the number of
prior plannings, which guarantees a repeat-free round whenever every participant still
has unseen partners among at least half of the other participants (not counting partners
that already lean the same way by two or more Essay A showings, since pairing those would
push one of them to three).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_RANDOM_CANDIDATES = 8
_REPAIR_WORK_LIMIT = 400_000
_SEVERE_IMBALANCE = 2

_Cost = tuple[int, int, int]
_FREE: _Cost = (0, 0, 0)


@dataclass(frozen=True)
class PairingHistory:
    """What has been planned so far; ``pair_counts`` keys are unordered essay pairs."""

    pair_counts: Mapping[frozenset[str], int]
    a_positions: Mapping[str, int]
    b_positions: Mapping[str, int]
    comparison_counts: Mapping[str, int]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> PairingHistory:
        """Build a history from ordered ``(essay_a, essay_b)`` pairs."""
        pair_counts: Counter[frozenset[str]] = Counter()
        a_positions: Counter[str] = Counter()
        b_positions: Counter[str] = Counter()
        comparison_counts: Counter[str] = Counter()
        for essay_a, essay_b in pairs:
            if essay_a == essay_b:
                raise ValueError(f"essay {essay_a!r} cannot be paired with itself")
            pair_counts[frozenset((essay_a, essay_b))] += 1
            a_positions[essay_a] += 1
            b_positions[essay_b] += 1
            comparison_counts[essay_a] += 1
            comparison_counts[essay_b] += 1
        return cls(
            pair_counts=dict(pair_counts),
            a_positions=dict(a_positions),
            b_positions=dict(b_positions),
            comparison_counts=dict(comparison_counts),
        )

    @classmethod
    def empty(cls) -> PairingHistory:
        """History of a batch with nothing planned yet."""
        return cls(pair_counts={}, a_positions={}, b_positions={}, comparison_counts={})


@dataclass
class _Plan:
    """Mutable working copy of the history over essay indices."""

    size: int
    pair_counts: dict[int, int]
    comparison_counts: list[int]
    a_positions: list[int]
    b_positions: list[int]


def all_pairs_seen(essay_ids: Sequence[str], history: PairingHistory) -> bool:
    """Whether every unordered pair of distinct essays has been planned at least once."""
    ids = set(essay_ids)
    needed = len(ids) * (len(ids) - 1) // 2
    seen = sum(
        1
        for pair, count in history.pair_counts.items()
        if count > 0 and len(pair) == 2 and pair <= ids
    )
    return seen >= needed


def generate_pairs(
    essay_ids: Sequence[str],
    history: PairingHistory,
    rng: np.random.Generator,
    *,
    matchings: int,
    max_pairs: int,
) -> list[tuple[str, str]]:
    """Plan up to ``matchings`` rounds of ordered ``(essay_a_id, essay_b_id)`` pairs.

    Rounds are returned one after another; a full round holds ``len(essay_ids) // 2``
    pairs. Participants are the essays with the fewest comparisons (ties at random), so
    with an odd count the most-compared essay sits out and, when ``max_pairs`` cuts a
    round short, the least-compared essays are served first; comparison counts therefore
    never drift more than one apart. Repeats are allowed once unseen partners run out,
    least-repeated first; callers decide whether to stop (see ``all_pairs_seen``).
    The essay further behind on Essay A showings is shown as Essay A.
    """
    ids = list(essay_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("essay_ids contains duplicates")
    if len(ids) < 2 or max_pairs <= 0 or matchings <= 0:
        return []

    plan = _plan_from_history(ids, history)
    planned: list[tuple[str, str]] = []
    for _ in range(matchings):
        budget = max_pairs - len(planned)
        if budget <= 0:
            break
        participants = _least_compared(plan, 2 * min(len(ids) // 2, budget), rng)
        pairs = _greedy_matching(plan, participants, rng)
        _improve_by_swaps(plan, pairs, rng)
        for first, second in pairs:
            essay_a, essay_b = _orient(plan, first, second, rng)
            _record(plan, essay_a, essay_b)
            planned.append((ids[essay_a], ids[essay_b]))
    return planned


def _plan_from_history(ids: list[str], history: PairingHistory) -> _Plan:
    index = {essay_id: position for position, essay_id in enumerate(ids)}
    size = len(ids)
    pair_counts: dict[int, int] = {}
    for pair, count in history.pair_counts.items():
        if count <= 0 or len(pair) != 2:
            continue
        first, second = (index.get(essay_id) for essay_id in pair)
        if first is None or second is None:
            continue
        pair_counts[_pair_key(size, first, second)] = count
    return _Plan(
        size=size,
        pair_counts=pair_counts,
        comparison_counts=[history.comparison_counts.get(essay_id, 0) for essay_id in ids],
        a_positions=[history.a_positions.get(essay_id, 0) for essay_id in ids],
        b_positions=[history.b_positions.get(essay_id, 0) for essay_id in ids],
    )


def _pair_key(size: int, first: int, second: int) -> int:
    return first * size + second if first < second else second * size + first


def _pair_count(plan: _Plan, first: int, second: int) -> int:
    return plan.pair_counts.get(_pair_key(plan.size, first, second), 0)


def _imbalance(plan: _Plan, essay: int) -> int:
    return plan.a_positions[essay] - plan.b_positions[essay]


def _orientation_conflict(plan: _Plan, first: int, second: int) -> int:
    """|A−B| when both essays lean the same way equally (one must lean further), else 0."""
    imbalance = _imbalance(plan, first)
    return abs(imbalance) if imbalance == _imbalance(plan, second) else 0


def _cost(plan: _Plan, first: int, second: int) -> _Cost:
    """(pushes an essay to |A−B| ≥ 3, prior plannings, pushes an essay to |A−B| = 2).

    Compared lexicographically: repeats are avoided before mild orientation drift, but
    not at the price of an essay leaning three or more showings one way.
    """
    conflict = _orientation_conflict(plan, first, second)
    severe = int(conflict >= _SEVERE_IMBALANCE)
    return severe, _pair_count(plan, first, second), int(conflict > 0) - severe


def _least_compared(plan: _Plan, count: int, rng: np.random.Generator) -> list[int]:
    """The ``count`` essays with the fewest comparisons, shuffled.

    Ties are broken at random within each A−B imbalance class, taking the classes in
    turn, so the chosen essays lean both ways equally and can be paired without pushing
    any of them further out of balance.
    """
    comparison_counts = np.asarray(plan.comparison_counts)
    imbalances = np.asarray(plan.a_positions) - np.asarray(plan.b_positions)
    shuffled = rng.permutation(plan.size)
    by_class = shuffled[
        np.lexsort((np.arange(plan.size), comparison_counts[shuffled], imbalances[shuffled]))
    ]
    class_rank = np.empty(plan.size, dtype=np.int64)
    starts = np.ones(plan.size, dtype=bool)
    starts[1:] = (np.diff(comparison_counts[by_class]) != 0) | (np.diff(imbalances[by_class]) != 0)
    group_start = np.maximum.accumulate(np.where(starts, np.arange(plan.size), 0))
    class_rank[by_class] = np.arange(plan.size) - group_start
    order = np.lexsort((rng.random(plan.size), class_rank, comparison_counts))
    return [int(essay) for essay in rng.permutation(order[:count])]


def _greedy_matching(
    plan: _Plan, participants: list[int], rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Pair each essay with a random unmatched partner, cheapest partner first.

    A few random candidates usually include an unseen, orientation-compatible partner;
    only when they do not is the whole unmatched pool scanned.
    """
    pool = list(participants)
    draws = iter(rng.random(len(pool) * (_RANDOM_CANDIDATES + 1)).tolist())
    pairs: list[tuple[int, int]] = []
    while len(pool) >= 2:
        essay = pool.pop()
        position = _choose_partner(plan, essay, pool, draws)
        partner = pool[position]
        pool[position] = pool[-1]
        pool.pop()
        pairs.append((essay, partner))
    return pairs


def _choose_partner(plan: _Plan, essay: int, pool: list[int], draws: Iterator[float]) -> int:
    """Position in ``pool`` of the partner for ``essay``."""
    unseen_position: int | None = None
    for _ in range(_RANDOM_CANDIDATES):
        position = int(next(draws) * len(pool))
        cost = _cost(plan, essay, pool[position])
        if cost == _FREE:
            return position
        if unseen_position is None and cost[:2] == _FREE[:2]:
            unseen_position = position
    if unseen_position is not None:
        return unseen_position
    start = int(next(draws) * len(pool))
    best_position = start
    best_cost = _cost(plan, essay, pool[start])
    for offset in range(1, len(pool)):
        if best_cost == _FREE:
            break
        position = (start + offset) % len(pool)
        cost = _cost(plan, essay, pool[position])
        if cost < best_cost:
            best_position, best_cost = position, cost
    return best_position


def _improve_by_swaps(plan: _Plan, pairs: list[tuple[int, int]], rng: np.random.Generator) -> None:
    """Exchange partners between two pairs while that lowers the summed pair costs.

    Stops at a local optimum or after a fixed amount of work, whichever comes first.
    """
    if len(pairs) < 2:
        return
    work = 0
    improved = True
    while improved and work < _REPAIR_WORK_LIMIT:
        improved = False
        for target in rng.permutation(len(pairs)).tolist():
            first, second = pairs[target]
            target_cost = _cost(plan, first, second)
            if target_cost == _FREE:
                continue
            for other in range(len(pairs)):
                work += 1
                if other == target:
                    continue
                third, fourth = pairs[other]
                current = _add(target_cost, _cost(plan, third, fourth))
                straight = _add(_cost(plan, first, third), _cost(plan, second, fourth))
                crossed = _add(_cost(plan, first, fourth), _cost(plan, second, third))
                if min(straight, crossed) < current:
                    if straight <= crossed:
                        pairs[target], pairs[other] = (first, third), (second, fourth)
                    else:
                        pairs[target], pairs[other] = (first, fourth), (second, third)
                    improved = True
                    break
            if work >= _REPAIR_WORK_LIMIT:
                break


def _add(left: _Cost, right: _Cost) -> _Cost:
    return left[0] + right[0], left[1] + right[1], left[2] + right[2]


def _orient(plan: _Plan, first: int, second: int, rng: np.random.Generator) -> tuple[int, int]:
    """Show as Essay A the essay with the lower A−B imbalance, then fewer A showings."""
    first_key = (_imbalance(plan, first), plan.a_positions[first])
    second_key = (_imbalance(plan, second), plan.a_positions[second])
    if first_key < second_key or (first_key == second_key and rng.random() < 0.5):
        return first, second
    return second, first


def _record(plan: _Plan, essay_a: int, essay_b: int) -> None:
    key = _pair_key(plan.size, essay_a, essay_b)
    plan.pair_counts[key] = plan.pair_counts.get(key, 0) + 1
    plan.comparison_counts[essay_a] += 1
    plan.comparison_counts[essay_b] += 1
    plan.a_positions[essay_a] += 1
    plan.b_positions[essay_b] += 1
