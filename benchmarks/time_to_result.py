"""Benchmark 2 of issue 5: time to result, synchronous workflow against batch workflow.

Same service, same assessments (30 and 100 essays; 500 for the batch workflow only), same
pairs (fresh database per run, so the measured assessment always has cj_batch_id 2 after the
warm-up, and pair generation is seeded per (cj_batch_id, iteration)), stability stopping off so
both run the same iterations to the same budget (10 comparisons per essay, 5 matchings per
iteration: 4 iterations). Two configurations through `batch_config_overrides`:

* synchronous: batch_size 10, max_concurrent_batches 1, partial_completion_threshold 1.0;
* batch:       batch_size 200, max_concurrent_batches 3, partial_completion_threshold 0.85.

The simulated provider has many slots and a heavy-tailed latency: lognormal, median 200 ms,
sigma 0.5, 3% of answers 10x slower (the issue's 2 s median scaled down 10x so that a 100-essay
synchronous run takes about two minutes, not twenty).

Per run: wall time submit -> completed event seen; the lower bound Σ_iterations q_t, q_t the
latency quantile at the threshold t of the configured distribution (exact, from the mixture
CDF; none for t = 1.0, where it is the maximum); the ideal time, i.e. the same batch policy
(slots, thresholds) with zero service overhead, once in expectation (Monte Carlo over the
configured distribution) and once with the latencies the provider actually drew; and the
per-iteration gaps: the last result needed to close iteration k published by the provider ->
handled by the service (`processing_metadata.iterations[k].completed_at`, the handler's clock,
equal to the closing attempts' `completed_at`) -> the first request of iteration k+1 published
(`cj_event_outbox.published_at`) -> received by the provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from scipy import optimize, stats

from benchmarks.system import BenchSystem, make_essays, running_system
from cj_assessment.pipeline_client import request_envelope

# --- configuration -------------------------------------------------------------------------------

MEDIAN_S = 0.200
SIGMA = 0.5
TAIL_RATE = 0.03
TAIL_FACTOR = 10.0
SLOTS = 2000
PROVIDER = {
    "latency_median_ms": MEDIAN_S * 1000,
    "latency_sigma": SIGMA,
    "tail_rate": TAIL_RATE,
    "tail_factor": TAIL_FACTOR,
    "slots": SLOTS,
    "seed": 5,
}
SERVICE = {
    "enable_stability_checking": False,
    "comparisons_per_essay": 10,
    "matchings_per_iteration": 5,
}
WORKFLOWS: dict[str, dict[str, Any]] = {
    "sync": {"batch_size": 10, "max_concurrent_batches": 1, "partial_completion_threshold": 1.0},
    "batch": {
        "batch_size": 200,
        "max_concurrent_batches": 3,
        "partial_completion_threshold": 0.85,
    },
}
TARGET_FASTER = 0.50  # batch at least 50% faster than sync
TARGET_BOUND = 0.15  # batch within 15% of its lower bound
TARGET_OVERHEAD_P95_S = 0.300  # per-iteration orchestration overhead p95, up to 500 essays


@dataclass(frozen=True)
class Plan:
    essays: int
    workflow: str
    repeat: int


def plans(quick: bool) -> list[Plan]:
    if quick:
        return [Plan(30, "sync", 1), Plan(30, "batch", 1)]
    runs = [Plan(30, "sync", 1)]
    runs += [Plan(30, "batch", r) for r in (1, 2, 3)]
    runs += [Plan(100, "sync", 1)]
    runs += [Plan(100, "batch", r) for r in (1, 2, 3)]
    runs += [Plan(500, "batch", 1)]
    return runs


# --- the latency model ---------------------------------------------------------------------------


def latency_cdf(x: float) -> float:
    if x <= 0:
        return 0.0
    body = stats.norm.cdf(math.log(x / MEDIAN_S) / SIGMA)
    tail = stats.norm.cdf(math.log(x / (MEDIAN_S * TAIL_FACTOR)) / SIGMA)
    return float((1 - TAIL_RATE) * body + TAIL_RATE * tail)


def latency_quantile(q: float) -> float:
    """The q-quantile of the provider's latency (lognormal body, 10x tail); inf for q >= 1."""
    if q >= 1.0:
        return math.inf
    log_x = optimize.brentq(lambda lx: latency_cdf(math.exp(lx)) - q, -20.0, 20.0, xtol=1e-9)
    return math.exp(log_x)


def sample_latencies(rng: np.random.Generator, shape: Any) -> np.ndarray:
    body = MEDIAN_S * np.exp(SIGMA * rng.standard_normal(shape))
    return body * np.where(rng.random(shape) < TAIL_RATE, TAIL_FACTOR, 1.0)


def ideal_iteration(batches: list[np.ndarray], *, max_concurrent: int, threshold: float) -> float:
    """Time for one iteration with zero overhead: batches (arrays of answer latencies, in
    release order) go out while fewer than `max_concurrent` are in flight; a batch frees its
    slot when ceil(threshold x size) of its answers are in; the iteration is done once every
    batch was released and ceil(threshold x planned) answers are in (completion_policy)."""
    planned = sum(len(b) for b in batches)
    done_heap: list[float] = []
    arrivals: list[np.ndarray] = []
    last_release = 0.0
    for i, latencies in enumerate(batches):
        release = 0.0 if i < max_concurrent else heapq.heappop(done_heap)
        last_release = max(last_release, release)
        ordered = np.sort(latencies)
        needed = min(len(ordered), math.ceil(threshold * len(ordered) - 1e-9))
        heapq.heappush(done_heap, release + float(ordered[needed - 1]))
        arrivals.append(release + ordered)
    every = np.sort(np.concatenate(arrivals))
    needed = min(planned, math.ceil(threshold * planned - 1e-9))
    return max(last_release, float(every[needed - 1]))


def expected_ideal(planned: int, config: dict[str, Any], reps: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    size = config["batch_size"]
    sizes = [min(size, planned - s) for s in range(0, planned, size)]
    total = 0.0
    for _ in range(reps):
        batches = [sample_latencies(rng, n) for n in sizes]
        total += ideal_iteration(
            batches,
            max_concurrent=config["max_concurrent_batches"],
            threshold=config["partial_completion_threshold"],
        )
    return total / reps


# --- one run -------------------------------------------------------------------------------------


@dataclass
class Boundary:
    """Iteration k -> k+1 (seconds; None when the provider timeline lacks the moment)."""

    result_to_handled: float | None  # closing result published by provider -> handled
    handled_to_published: float  # -> first request of k+1 published (orchestration overhead)
    handled_to_all_published: float  # -> last request released at the boundary published
    published_to_provider: float | None  # first request published -> received by provider

    @property
    def total(self) -> float | None:
        if self.result_to_handled is None or self.published_to_provider is None:
            return None
        return self.result_to_handled + self.handled_to_published + self.published_to_provider


@dataclass
class RunResult:
    plan: Plan
    wall: float
    completed: bool
    iterations: int
    comparisons: int
    stop_reason: str
    pairs_digest: str
    lower_bound: float | None
    expected_ideal: float
    realised_ideal: float | None
    boundaries: list[Boundary] = field(default_factory=list)
    release_to_published: list[float] = field(default_factory=list)
    result_pickup: list[float] = field(default_factory=list)  # provider published -> handled
    latency_inflation: list[float] = field(default_factory=list)
    start: float | None = None  # submit -> first request received by provider
    end: float | None = None  # last closing result published -> outcome seen
    provider_wait: float | None = None  # Σ first request received -> closing result published


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


async def _measure(plan: Plan) -> RunResult:
    config = WORKFLOWS[plan.workflow]
    essays = make_essays(plan.essays)
    bos = f"ttr-{plan.essays}-{plan.workflow}-{plan.repeat}"
    async with running_system(provider=PROVIDER, **SERVICE) as system:
        await system.submit(
            request_envelope(bos_batch_id=bos, essays=essays, batch_config_overrides=config)
        )
        timeout = 900.0 if plan.workflow == "sync" else 400.0
        outcome = (await system.wait_for([bos], timeout=timeout))[bos]
        return await _analyse(system, plan, bos, outcome)


async def _analyse(system: BenchSystem, plan: Plan, bos: str, outcome: Any) -> RunResult:
    config = WORKFLOWS[plan.workflow]
    threshold = config["partial_completion_threshold"]
    settings = system.settings
    provider = system.provider
    assert provider is not None
    data = outcome.event["data"]
    summary = data.get("processing_summary") or {}
    (cj,) = (await system.rows("SELECT id FROM cj_batch_uploads WHERE bos_batch_id = :b", b=bos))[0]
    (metadata,) = (
        await system.rows(
            "SELECT processing_metadata FROM cj_batch_states WHERE cj_batch_id = :cj", cj=cj
        )
    )[0]
    attempts = await system.rows(
        "SELECT request_correlation_id::text, iteration, attempt, submission_batch_id::text,"
        " submitted_at, completed_at, essay_a_els_id, essay_b_els_id"
        " FROM cj_comparison_pairs WHERE cj_batch_id = :cj ORDER BY id",
        cj=cj,
    )
    outbox = await system.rows(
        "SELECT payload::jsonb #>> '{data,correlation_id}', published_at FROM cj_event_outbox"
        " WHERE topic = :t",
        t=settings.topic_llm_comparison_request,
    )
    published = {cid: at for cid, at in outbox if at is not None}
    created = (await system.rows("SELECT created_at FROM cj_batch_uploads WHERE id = :cj", cj=cj))[
        0
    ][0]

    iterations = sorted(metadata.get("iterations", []), key=lambda it: it["iteration"])
    firsts = [a for a in attempts if a[2] == 1]
    digest = hashlib.sha256(repr(sorted((a[1], a[6], a[7]) for a in firsts)).encode()).hexdigest()[
        :12
    ]

    # Lower bound and ideal times, per iteration.
    quantile = latency_quantile(threshold)
    lower = None if math.isinf(quantile) else quantile * len(iterations)
    reps = 200 if plan.essays >= 500 else 400
    expected = sum(
        expected_ideal(it["planned"], config, reps, seed=it["iteration"]) for it in iterations
    )
    by_batch: dict[str, list[tuple[int, str]]] = defaultdict(list)
    batch_order: dict[int, list[str]] = defaultdict(list)
    for row_id, a in enumerate(firsts):
        if a[3] not in by_batch:
            batch_order[a[1]].append(a[3])
        by_batch[a[3]].append((row_id, a[0]))
    realised: float | None = 0.0
    for it in iterations:
        lat_batches = []
        for batch_id in batch_order[it["iteration"]]:
            lats = [provider.latency.get(cid) for _, cid in by_batch[batch_id]]
            if any(x is None for x in lats):
                realised = None
                break
            lat_batches.append(np.asarray(lats, dtype=float))
        if realised is None:
            break
        realised += ideal_iteration(
            lat_batches,
            max_concurrent=config["max_concurrent_batches"],
            threshold=threshold,
        )

    # Iteration boundaries.
    boundaries: list[Boundary] = []
    provider_wait: float | None = 0.0
    last_closing_published: datetime | None = None
    for k, it in enumerate(iterations):
        if not it.get("completed_at"):
            continue
        closed = _parse(it["completed_at"])
        closing = [a for a in attempts if a[5] is not None and a[5] == closed]
        if not closing:  # clocks differ in precision: take the last results handled by then
            handled = [a[5] for a in attempts if a[1] == it["iteration"] and a[5] is not None]
            last = max((t for t in handled if t <= closed), default=None)
            closing = [a for a in attempts if a[5] == last]
        closing_pub = [provider.published.get(a[0]) for a in closing]
        closing_pub_t = max((t for t in closing_pub if t is not None), default=None)
        this_firsts = [a for a in firsts if a[1] == it["iteration"]]
        first_recv = min(
            (provider.received[a[0]] for a in this_firsts if a[0] in provider.received),
            default=None,
        )
        if provider_wait is not None and first_recv and closing_pub_t:
            provider_wait += (closing_pub_t - first_recv).total_seconds()
        else:
            provider_wait = None
        last_closing_published = closing_pub_t
        if k + 1 >= len(iterations):
            continue
        nxt = [a for a in firsts if a[1] == iterations[k + 1]["iteration"]]
        released = [a for a in nxt if a[4] == closed] or nxt
        pubs = [published[a[0]] for a in released if a[0] in published]
        if not pubs:
            continue
        recv = [provider.received[a[0]] for a in released if a[0] in provider.received]
        first_pub = min(pubs)
        boundaries.append(
            Boundary(
                result_to_handled=(closed - closing_pub_t).total_seconds()
                if closing_pub_t
                else None,
                handled_to_published=(first_pub - closed).total_seconds(),
                handled_to_all_published=(max(pubs) - closed).total_seconds(),
                published_to_provider=(min(recv) - first_pub).total_seconds() if recv else None,
            )
        )

    # Every release transaction (iteration starts and slot releases): handler clock -> publish.
    groups: dict[datetime, list[str]] = defaultdict(list)
    for a in attempts:
        if a[4] is not None:
            groups[a[4]].append(a[0])
    release_gaps = [
        (min(published[c] for c in cids if c in published) - at).total_seconds()
        for at, cids in groups.items()
        if any(c in published for c in cids)
    ]
    pickup = [
        (a[5] - provider.published[a[0]]).total_seconds()
        for a in attempts
        if a[5] is not None and a[0] in provider.published
    ]
    inflation = [
        (provider.published[c] - provider.received[c]).total_seconds() - provider.latency[c]
        for c in provider.published
        if c in provider.received and c in provider.latency
    ]
    first_recv_all = min(
        (provider.received[a[0]] for a in firsts if a[0] in provider.received), default=None
    )
    start = (first_recv_all - system.submitted_at[bos]).total_seconds() if first_recv_all else None
    end = (
        (outcome.seen_at - last_closing_published).total_seconds()
        if last_closing_published
        else None
    )
    del created
    return RunResult(
        plan=plan,
        wall=outcome.seconds,
        completed=outcome.completed,
        iterations=len(iterations),
        comparisons=int(summary.get("comparisons_requested") or len(firsts)),
        stop_reason=str(summary.get("stop_reason") or data.get("status")),
        pairs_digest=digest,
        lower_bound=lower,
        expected_ideal=expected,
        realised_ideal=realised,
        boundaries=boundaries,
        release_to_published=release_gaps,
        result_pickup=pickup,
        latency_inflation=inflation,
        start=start,
        end=end,
        provider_wait=provider_wait,
    )


# --- report --------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f}"


def _p(values: list[float | None], q: float) -> float | None:
    return _pct([v for v in values if v is not None], q)


def report(results: list[RunResult], quick: bool, elapsed: float) -> str:
    q85 = latency_quantile(0.85)
    lines = [
        "Time to result: synchronous workflow (batch 10, 1 in flight, threshold 1.0) vs batch",
        "workflow (batch 200, 3 in flight, threshold 0.85); budget 10 comparisons/essay, 5",
        "matchings/iteration, stability stopping off; one service instance, real broker + DB.",
        f"Provider: {SLOTS} slots, lognormal latency median {MEDIAN_S * 1000:.0f} ms, sigma "
        f"{SIGMA}, {TAIL_RATE:.0%} of answers {TAIL_FACTOR:.0f}x slower (issue: median 2 s; "
        "scaled down 10x). Latency quantiles:",
        f"  p50 {latency_quantile(0.5) * 1000:.0f} ms, p85 {q85 * 1000:.0f} ms, "
        f"p95 {latency_quantile(0.95) * 1000:.0f} ms, p99 {latency_quantile(0.99) * 1000:.0f} ms",
        "lower bound = iterations x latency quantile at the threshold (none at 1.0: the max);",
        "ideal = same batch policy with zero service overhead: E[...] over the configured",
        "distribution, and with the latencies the provider actually drew in this run.",
        "",
        f"{'essays':>6} {'workflow':<8} {'rep':>3} {'iters':>5} {'compars':>7} {'wall s':>7} "
        f"{'lower s':>7} {'E[ideal]':>8} {'ideal':>6} {'wall/LB':>7} {'wall/ideal':>10} "
        f"{'pairs':>12}",
    ]
    for r in results:
        ratio_lb = None if r.lower_bound is None else r.wall / r.lower_bound
        ratio_id = None if not r.realised_ideal else r.wall / r.realised_ideal
        lines.append(
            f"{r.plan.essays:>6} {r.plan.workflow:<8} {r.plan.repeat:>3} {r.iterations:>5} "
            f"{r.comparisons:>7} {r.wall:>7.2f} {_f(r.lower_bound):>7} "
            f"{r.expected_ideal:>8.2f} {_f(r.realised_ideal):>6} {_f(ratio_lb):>7} "
            f"{_f(ratio_id):>10} {r.pairs_digest:>12}" + ("" if r.completed else "  FAILED")
        )

    lines += [
        "",
        "Per-iteration gaps, iteration k -> k+1, ms (p50 / p95 over the boundaries of a run;",
        "orchestration overhead = closing result handled -> first request of k+1 published):",
        f"{'essays':>6} {'workflow':<8} {'rep':>3} {'n':>2} {'result->handled':>16} "
        f"{'handled->published':>19} {'->all released':>15} {'published->provider':>20} "
        f"{'total gap':>13}",
    ]
    for r in results:
        b = r.boundaries

        def pair(values: list[float | None]) -> str:
            return f"{_ms(_p(values, 50))} / {_ms(_p(values, 95))}"

        lines.append(
            f"{r.plan.essays:>6} {r.plan.workflow:<8} {r.plan.repeat:>3} {len(b):>2} "
            f"{pair([x.result_to_handled for x in b]):>16} "
            f"{pair([x.handled_to_published for x in b]):>19} "
            f"{pair([x.handled_to_all_published for x in b]):>15} "
            f"{pair([x.published_to_provider for x in b]):>20} "
            f"{pair([x.total for x in b]):>13}"
        )

    lines += [
        "",
        "Where the time goes, s (start = submit -> first request at the provider; provider =",
        "Σ first request at provider -> closing result published; gaps = Σ iteration gaps;",
        "end = last closing result published -> completed event seen), and per result:",
        "pickup = provider published -> service handled, ms; release = any submission batch",
        "released -> its first request published, ms; inflation = provider's actual minus",
        "drawn latency (event-loop lateness in this shared process), ms.",
        f"{'essays':>6} {'workflow':<8} {'rep':>3} {'start':>6} {'provider':>8} {'gaps':>6} "
        f"{'end':>6} {'pickup p50/p95/max':>19} {'release p50/p95':>16} "
        f"{'inflation p50/p95':>18}",
    ]
    for r in results:
        gaps = [x.total for x in r.boundaries]
        gap_sum = None if any(g is None for g in gaps) else sum(g for g in gaps if g is not None)
        lines.append(
            f"{r.plan.essays:>6} {r.plan.workflow:<8} {r.plan.repeat:>3} {_f(r.start):>6} "
            f"{_f(r.provider_wait):>8} {_f(gap_sum):>6} {_f(r.end):>6} "
            f"{_ms(_pct(r.result_pickup, 50)) + ' / ' + _ms(_pct(r.result_pickup, 95)) + ' / ' + _ms(max(r.result_pickup, default=None)):>19} "  # noqa: E501
            f"{_ms(_pct(r.release_to_published, 50)) + ' / ' + _ms(_pct(r.release_to_published, 95)):>16} "  # noqa: E501
            f"{_ms(_pct(r.latency_inflation, 50)) + ' / ' + _ms(_pct(r.latency_inflation, 95)):>18}"  # noqa: E501
        )

    lines += ["", "Targets (baseline = the synchronous workflow of the same run):"]
    by_size: dict[int, dict[str, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_size[r.plan.essays][r.plan.workflow].append(r)
    for essays, flows in sorted(by_size.items()):
        batch = flows.get("batch", [])
        sync = flows.get("sync", [])
        if not batch:
            continue
        wall = statistics.median(r.wall for r in batch)
        note = f"{essays} essays: batch median {wall:.2f} s over {len(batch)} run(s)"
        if sync:
            sync_wall = statistics.median(r.wall for r in sync)
            faster = 1 - wall / sync_wall
            ok = "MET" if faster >= TARGET_FASTER else "MISSED"
            same = {r.pairs_digest for r in batch + sync}
            lines.append(
                f"  {note}; sync {sync_wall:.2f} s: {faster:.0%} faster (target >= 50%): {ok}; "
                f"same pairs: {'yes' if len(same) == 1 else 'NO ' + str(sorted(same))}"
            )
        else:
            lines.append(f"  {note}")
        bound = statistics.median(r.lower_bound for r in batch if r.lower_bound is not None)
        excess = wall / bound - 1
        ok = "MET" if excess <= TARGET_BOUND else "MISSED"
        lines.append(
            f"  {essays} essays: batch vs lower bound {bound:.2f} s: +{excess:.0%} "
            f"(target <= +15%): {ok}"
        )
        overhead = [x.handled_to_published for r in batch for x in r.boundaries]
        p95 = _pct(overhead, 95)
        ok = "MET" if p95 is not None and p95 <= TARGET_OVERHEAD_P95_S else "MISSED"
        total = [x.total for r in batch for x in r.boundaries if x.total is not None]
        lines.append(
            f"  {essays} essays: orchestration overhead p50 {_ms(_pct(overhead, 50))} ms, "
            f"p95 {_ms(p95)} ms over {len(overhead)} boundaries (target p95 <= 300 ms): {ok}; "
            f"whole gap incl. both Kafka hops p95 {_ms(_pct(total, 95))} ms"
        )
    lines.append("")
    lines.append(
        f"{'quick' if quick else 'full'} run, {len(results)} assessments, "
        f"{elapsed:.0f} s including set-up (fresh database + topics + warm-up per run)"
    )
    return "\n".join(lines)


async def _main(quick: bool) -> str:
    started = time.monotonic()
    results = []
    for plan in plans(quick):
        print(
            f"  time-to-result: {plan.essays} essays, {plan.workflow} workflow, run {plan.repeat}",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.monotonic()
        results.append(await _measure(plan))
        print(
            f"    wall {results[-1].wall:.2f} s (scenario {time.monotonic() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return report(results, quick, time.monotonic() - started)


def run(quick: bool = False) -> str:
    return asyncio.run(_main(quick))


if __name__ == "__main__":
    from cj_assessment.logs import configure_logging

    configure_logging("WARNING", json=False)
    print(run("--quick" in sys.argv))
