"""Bradley–Terry scoring of pairwise comparative judgements, aware of the judge's position bias.

Model: logit P(Essay A wins) = θ_A − θ_B + β, where β is the judge's first-position advantage
(0 for a judge without one), and the abilities are drawn from N(0, τ²).

Scores are empirical-Bayes posterior means: τ² is estimated from the judgements (type-II
maximum likelihood) and the posterior of (θ, β) is computed by expectation propagation (EP),
with every comparison's likelihood matched by moments rather than by the curvature at the
mode (the Laplace approximation under-states both τ² and the posterior precision when essays
have few comparisons, or were paired adaptively). An essay that won all of few comparisons is
therefore not pushed to an extreme the data do not support. Standard errors are posterior
standard deviations under the sum-to-zero constraint (no reference essay), including the
uncertainty of β. Fitting β rather than assuming it away matters even with balanced A/B
showings: balance only makes the bias cancel on average over an essay's comparisons, while
fitting it removes it from every comparison (and reports it).

Two reliabilities are reported:

* ``reliability``, the calibrated one, Var(θ̄) / (Var(θ̄) + mean posterior variance). In this
  model Var(θ) = Var(θ̄) + E[Var(θ | data)] and Cov(θ̄, θ) = Var(θ̄), so the ratio is the
  expected squared correlation between the reported scores and the true abilities; and since
  the likelihood does not depend on how pairs were chosen from earlier outcomes, it stays
  honest under adaptive pairing.
* ``scale_separation_reliability`` (SSR), (Var(θ̂) − mean SE²) / Var(θ̂) of the customary
  weakly regularised maximum a-posteriori fit (``alpha * sum(theta**2)`` with alpha = 0.01,
  the ``choix.opt_pairwise`` estimator), kept for comparison with other CJ tools. Adaptive
  pairing inflates it: the near-flat prior lets essays that won their early comparisons drift
  outwards, and comparisons among similarly lucky neighbours then "confirm" the drift
  (Bramley & Vitello 2019). ``benchmarks/pairing.py`` measures both against the truth.

The weakly regularised fit is a damped Newton iteration whose steps are solved by conjugate
gradients on the sparse information matrix (β enters through a Schur complement); EP then
needs a handful of dense factorisations, so 2,000 essays score in about a second on 2 cores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from scipy import linalg
from scipy.linalg import blas
from scipy.special import expit, log_expit

MAX_STANDARD_ERROR = 10.0
"""Upper bound on reported standard errors; also the SE of essays with no comparisons."""

_MAX_NEWTON_ITERATIONS = 100
_GRADIENT_TOLERANCE = 1e-9
_STEP_TOLERANCE = 1e-12
_MIN_STEP_FRACTION = 1e-10
_CG_TOLERANCE = 1e-10
_CG_MIN_ITERATIONS = 200
_DENSE_SOLVE_MAX_ESSAYS = 200

RAW_ALPHA = 0.01
"""Prior strength of the weakly regularised fit behind the raw SSR (``choix``'s ``alpha``)."""

_BETA_RIDGE = 2.0 * RAW_ALPHA  # a weak prior on β, only to keep a one-sided judge finite

# Empirical Bayes by expectation propagation (see `_expectation_propagation`). A sweep costs
# one dense factorisation and inversion; typical assessments converge in 5–15 sweeps.
_MIN_PRIOR_VARIANCE = 1e-3
_MAX_PRIOR_VARIANCE = 1e2
_EP_MAX_SWEEPS = 30
_PRIOR_MAX_LOG_STEP = 0.5  # in log τ² per sweep
_RELIABILITY_BOUND_Z = 1.645  # one-sided 95%
_EM_CRAWL = 0.7  # EM contraction factor above which a Newton step replaces it
_EP_PRIOR_TOLERANCE = 0.02  # estimated remaining distance to the τ² fixed point, in log τ²
_EP_TOLERANCE = 5e-3  # largest score move per sweep, relative to the scores' spread; β move
_EP_RELIABILITY_TOLERANCE = 1e-3
_EP_MIN_SPREAD = 1e-3
_EP_MIN_PRECISION = 1e-10
_HERMITE_NODES, _HERMITE_WEIGHTS = np.polynomial.hermite_e.hermegauss(32)
_HERMITE_WEIGHTS = _HERMITE_WEIGHTS / _HERMITE_WEIGHTS.sum()
_HERMITE_FIRST = _HERMITE_WEIGHTS * _HERMITE_NODES
_HERMITE_SECOND = _HERMITE_FIRST * _HERMITE_NODES

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]


class Judgement(NamedTuple):
    """One answered comparison as the judge saw it: who was shown first, and who won."""

    essay_a: str
    essay_b: str
    a_won: bool


@dataclass(frozen=True)
class EssayScore:
    """Score of one essay; `rank` 1 is the best essay."""

    essay_id: str
    score: float
    standard_error: float
    rank: int
    comparison_count: int
    wins: int
    losses: int


@dataclass(frozen=True)
class PositionBias:
    """The judge's first-position advantage as seen in the judgements.

    ``a_win_share`` is the raw share of judgements won by Essay A; ``logit`` is the fitted β
    of logit P(A wins) = θ_A − θ_B + β, which, unlike the raw share, does not depend on which
    pairs happened to be shown in which order.
    """

    a_win_share: float
    logit: float
    standard_error: float


@dataclass(frozen=True)
class ScoringResult:
    """Scores ordered by rank and the reliability of the scale.

    ``reliability`` is the calibrated (empirical-Bayes) estimate of the squared correlation
    between scores and true abilities; ``reliability_lower_bound`` is the same at the lower end
    of a one-sided 95% interval for the spread of the abilities, what a target reliability is
    checked against; ``scale_separation_reliability`` is the raw SSR.
    ``position_bias`` is None when the judgements carried no orientation.
    """

    essays: tuple[EssayScore, ...]
    reliability: float | None
    scale_separation_reliability: float | None = None
    position_bias: PositionBias | None = None
    reliability_lower_bound: float | None = None

    def scores(self) -> dict[str, float]:
        """Map essay id to its Bradley–Terry score."""
        return {essay.essay_id: essay.score for essay in self.essays}

    def standard_errors(self) -> dict[str, float]:
        """Map essay id to the standard error of its score."""
        return {essay.essay_id: essay.standard_error for essay in self.essays}


@dataclass(frozen=True)
class _Edges:
    """Judgements aggregated per ordered pair (shown as A, shown as B) of scored essays.

    ``low``/``high`` list the unordered pairs (low < high) and ``pair`` maps each ordered
    pair to its unordered one, so dense matrices are assembled without an n² scatter.
    """

    a: IntArray
    b: IntArray
    total: FloatArray
    a_wins: FloatArray
    pair: IntArray
    low: IntArray
    high: IntArray


@dataclass(frozen=True)
class _Fit:
    theta: FloatArray
    beta: float


@dataclass(frozen=True)
class _Posterior:
    """Projected posterior variances of the abilities, and the variance of β (0 if fixed)."""

    theta_variance: FloatArray
    beta_variance: float


def score_judgements(
    essay_ids: Sequence[str],
    judgements: Iterable[tuple[str, str, bool]],
    *,
    fit_position_bias: bool = True,
    alpha: float | None = None,
    prior_variance: float | None = None,
) -> ScoringResult:
    """Score essays from ``(essay_a, essay_b, a_won)`` judgements.

    By default the abilities get the empirical-Bayes prior N(0, τ²) with τ² estimated from
    the judgements, and scores are the posterior means: an essay that won (or lost) all of
    few comparisons is not pushed to an extreme the data do not support, which ranks better
    than the near-flat prior at low budgets. With ``alpha`` the prior is fixed at
    ``alpha * sum(theta**2)`` instead (``alpha=0.01`` and no position bias is the
    ``choix.opt_pairwise`` estimator).

    Scores are mean-centred over the essays that took part in at least one comparison.
    Essays without comparisons get score 0.0 and standard error ``MAX_STANDARD_ERROR`` and
    are ranked after scored essays with an equal score. Standard errors are posterior
    standard deviations under the sum-to-zero constraint, so no reference essay is needed,
    and include the uncertainty of β; they are capped at ``MAX_STANDARD_ERROR``.

    With ``fit_position_bias`` false, β is held at 0 (the plain Bradley–Terry model).

    With ``prior_variance`` the abilities' prior variance τ² is taken as given instead of
    estimated, for when the spread of the abilities is known (or to measure how much of the
    reliability's error comes from estimating it; see ``benchmarks/pairing.py``).

    Raises ``ValueError`` when there are no judgements, ids are duplicated or unknown, an
    essay is compared with itself, or ``alpha`` or ``prior_variance`` is not positive.
    """
    ids = list(essay_ids)
    index = {essay_id: position for position, essay_id in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError("essay_ids contains duplicates")
    if alpha is not None and not alpha > 0.0:
        raise ValueError("alpha must be positive")
    if prior_variance is not None and not (0.0 < prior_variance < np.inf):
        raise ValueError("prior_variance must be positive and finite")
    shown_a, shown_b, a_won = _encode_judgements(judgements, index)
    if shown_a.size == 0:
        raise ValueError("cannot score without any judgements")

    n_all = len(ids)
    winners = np.where(a_won, shown_a, shown_b)
    losers = np.where(a_won, shown_b, shown_a)
    wins = np.bincount(winners, minlength=n_all)
    losses = np.bincount(losers, minlength=n_all)

    scored = np.flatnonzero(wins + losses > 0)
    local = np.full(n_all, -1, dtype=np.intp)
    local[scored] = np.arange(scored.size)
    edges = _aggregate_edges(local[shown_a], local[shown_b], a_won, scored.size)

    # The customary weakly regularised fit: its SSR is reported for comparison with other
    # CJ tools, and it is the scale itself when a fixed prior was asked for.
    raw_ridge = 2.0 * (RAW_ALPHA if alpha is None else alpha)
    raw = _fit(edges, scored.size, ridge=raw_ridge, fit_bias=fit_position_bias)
    raw_posterior = _posterior(edges, raw, ridge=raw_ridge, fit_bias=fit_position_bias)
    raw_se = np.minimum(np.sqrt(raw_posterior.theta_variance), MAX_STANDARD_ERROR)
    ssr = scale_separation_reliability(raw.theta, raw_se)

    # EP starts from the Laplace approximation under a guess for τ²: the method-of-moments
    # signal variance behind SSR, shrunk by SSR because the raw fit is over-dispersed when
    # comparisons are few.
    signal = float(np.var(raw.theta) - np.mean(raw_posterior.theta_variance))
    guess = float(np.clip(signal * (ssr or 0.0), 0.1, 10.0))
    if prior_variance is not None:
        guess = prior_variance
    start = _fit(edges, scored.size, ridge=1.0 / guess, fit_bias=fit_position_bias, start=raw)
    bayes = _expectation_propagation(
        edges,
        scored.size,
        start,
        prior_variance=guess,
        fit_bias=fit_position_bias,
        estimate_prior=prior_variance is None,
    )
    if alpha is None:
        theta, theta_variance = bayes.theta, bayes.theta_variance
    else:
        theta, theta_variance = raw.theta, raw_posterior.theta_variance

    scores = np.zeros(n_all)
    scores[scored] = theta
    standard_errors = np.full(n_all, MAX_STANDARD_ERROR)
    standard_errors[scored] = np.minimum(np.sqrt(theta_variance), MAX_STANDARD_ERROR)

    bias = None
    if fit_position_bias:
        bias = PositionBias(
            a_win_share=float(np.mean(a_won)),
            logit=bayes.beta,
            standard_error=float(np.sqrt(bayes.beta_variance)),
        )
    return ScoringResult(
        essays=_ranked_essays(ids, scores, standard_errors, wins, losses),
        # Fewer than three essays or no spread at all: no scale to be reliable about.
        reliability=None if ssr is None else bayes.reliability,
        scale_separation_reliability=ssr,
        position_bias=bias,
        reliability_lower_bound=None if ssr is None else bayes.reliability_lower_bound,
    )


def score_comparisons(
    essay_ids: Sequence[str],
    outcomes: Sequence[tuple[str, str]],
    *,
    alpha: float = RAW_ALPHA,
) -> ScoringResult:
    """Score essays from ``(winner_id, loser_id)`` outcomes with the plain Bradley–Terry model.

    Outcomes carry no orientation, so no position bias can be fitted; scores are the MAP
    under the fixed prior ``alpha`` (the ``choix.opt_pairwise`` estimator). See
    ``score_judgements`` for everything else; ``reliability`` is the same calibrated one.
    """
    if not outcomes:
        raise ValueError("cannot score without any comparison outcomes")
    return score_judgements(
        essay_ids,
        ((winner, loser, True) for winner, loser in outcomes),
        alpha=alpha,
        fit_position_bias=False,
    )


def scale_separation_reliability(
    scores: Sequence[float] | FloatArray, standard_errors: Sequence[float] | FloatArray
) -> float | None:
    """(observed variance − mean error variance) / observed variance, clipped to [0, 1].

    ``None`` when fewer than three essays or the scores have no spread, because the ratio
    is then meaningless.
    """
    values = np.asarray(scores, dtype=float)
    errors = np.asarray(standard_errors, dtype=float)
    if values.size < 3:
        return None
    observed = float(np.var(values, ddof=1))
    if not np.isfinite(observed) or observed <= 1e-12:
        return None
    reliability = (observed - float(np.mean(errors**2))) / observed
    return float(np.clip(reliability, 0.0, 1.0))


@dataclass(frozen=True)
class _Bayes:
    """Posterior of the empirical-Bayes model: centred means and variances of the abilities."""

    theta: FloatArray
    theta_variance: FloatArray
    beta: float
    beta_variance: float
    prior_variance: float
    reliability: float
    reliability_lower_bound: float = 0.0


@dataclass(frozen=True)
class _Gaussian:
    """The Gaussian approximation N(mean, covariance) over (θ, β) and what EP needs of it.

    ``covariance`` holds the lower triangle only (the upper one is zero), as LAPACK returns it.
    """

    mean: FloatArray
    covariance: FloatArray
    edge_mean: FloatArray  # of x_k = θ_a − θ_b + β per edge
    edge_variance: FloatArray

    def symmetric_product(self, vector: FloatArray) -> FloatArray:
        return np.asarray(blas.dsymv(1.0, self.covariance, vector, lower=1))


def _expectation_propagation(
    edges: _Edges,
    n: int,
    start: _Fit,
    *,
    prior_variance: float,
    fit_bias: bool,
    estimate_prior: bool = True,
) -> _Bayes:
    """Posterior under the prior θ ~ N(0, τ² I), with τ² estimated (unless ``estimate_prior``
    is false), by expectation propagation.

    Every edge's likelihood σ(x)^wins σ(−x)^losses, x = θ_a − θ_b + β, is replaced by a
    Gaussian site chosen so that the approximation matches the mean and variance of the
    "tilted" distribution (the approximation with that one site exact; 1-D moments by
    Gauss–Hermite quadrature). All sites are updated at once from one factorisation (parallel
    EP). The sites start as the Laplace approximation at ``start``, so a few sweeps suffice.
    τ² follows the type-II maximum-likelihood condition τ² = (‖E θ‖² + tr Cov θ) / n
    (EM, with Newton steps where EM would crawl).

    Laplace is not used for this: with few comparisons per essay, or pairs chosen to be
    close, the posterior is skewed and the mode-and-curvature approximation under-states
    both τ² and the precision of the posterior means; on simulated assessments it reported
    0.51 for a true squared correlation of 0.58 at 5 comparisons per essay (EP: 0.58).
    """
    mean_x = start.theta[edges.a] - start.theta[edges.b] + start.beta
    p = expit(mean_x)
    site_precision = edges.total * p * (1.0 - p)
    site_shift = site_precision * mean_x + (edges.a_wins - edges.total * p)
    previous: _Bayes | None = None
    for _ in range(_EP_MAX_SWEEPS):
        gaussian = _site_posterior(
            edges, n, site_precision, site_shift, prior_variance=prior_variance, fit_bias=fit_bias
        )
        current = _bayes_summary(gaussian, n, prior_variance, fit_bias=fit_bias)
        prior_distance = 0.0
        if estimate_prior:
            prior_variance, prior_distance = _update_prior_variance(gaussian, n, prior_variance)
        # Stop once τ² is close to its fixed point and what is reported has settled: the
        # scores (relative to their spread), β and the reliability.
        if previous is not None and prior_distance < _EP_PRIOR_TOLERANCE:
            spread = max(float(np.std(current.theta)), _EP_MIN_SPREAD)
            settled = (
                float(np.max(np.abs(current.theta - previous.theta))) < _EP_TOLERANCE * spread
                and abs(current.beta - previous.beta) < _EP_TOLERANCE
                and abs(current.reliability - previous.reliability) < _EP_RELIABILITY_TOLERANCE
            )
            if settled:
                break
        previous = current
        site_precision, site_shift = _refined_sites(edges, gaussian, site_precision, site_shift)
    if not estimate_prior:
        return replace(current, reliability_lower_bound=current.reliability)
    # Stopping when an estimate first reaches a target picks the runs whose estimate is too
    # high, and most of a reliability's error at low budgets is that of τ². So a target is
    # checked against the reliability at the lower end of a one-sided 95% interval for τ²:
    # the evidence's curvature in log τ² at its maximum is (n/2)(1 − F'), F' as in
    # `_update_prior_variance`, with the sites held where EP left them.
    _, contraction = _prior_fixed_point(gaussian, n, current.prior_variance)
    spread = math.sqrt(2.0 / (n * (1.0 - contraction)))
    low = max(
        current.prior_variance * math.exp(-_RELIABILITY_BOUND_Z * spread), _MIN_PRIOR_VARIANCE
    )
    at_low = _bayes_summary(
        _site_posterior(
            edges, n, site_precision, site_shift, prior_variance=low, fit_bias=fit_bias
        ),
        n,
        low,
        fit_bias=fit_bias,
    )
    return replace(current, reliability_lower_bound=min(at_low.reliability, current.reliability))


def _refined_sites(
    edges: _Edges, gaussian: _Gaussian, site_precision: FloatArray, site_shift: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """One parallel EP update: cavity, tilted moments, new site = tilted / cavity."""
    cavity_precision = 1.0 / gaussian.edge_variance - site_precision
    cavity_shift = gaussian.edge_mean / gaussian.edge_variance - site_shift
    usable = cavity_precision > _EP_MIN_PRECISION
    cavity_variance = 1.0 / np.where(usable, cavity_precision, 1.0)
    tilted_mean, tilted_variance = _tilted_moments(
        edges, cavity_variance * cavity_shift, cavity_variance
    )
    new_precision = 1.0 / tilted_variance - cavity_precision
    new_shift = tilted_mean / tilted_variance - cavity_shift
    # The likelihood is log-concave, so a proper update never loses precision; anything else
    # is quadrature round-off on a site that is already right.
    usable &= np.isfinite(new_precision) & (new_precision > 0.0) & np.isfinite(new_shift)
    return np.where(usable, new_precision, site_precision), np.where(usable, new_shift, site_shift)


def _bayes_summary(gaussian: _Gaussian, n: int, prior_variance: float, *, fit_bias: bool) -> _Bayes:
    """Centred means and variances of the abilities (sum-to-zero projection), β, reliability."""
    size = gaussian.mean.size
    ones = np.zeros(size)
    ones[:n] = 1.0
    row_means = gaussian.symmetric_product(ones)[:n] / n
    variance = np.diag(gaussian.covariance)[:n] - 2.0 * row_means + row_means.mean()
    variance = np.maximum(variance, 0.0)
    theta = gaussian.mean[:n] - gaussian.mean[:n].mean()
    signal = float(theta @ theta)
    noise = float(variance.sum())
    return _Bayes(
        theta=theta,
        theta_variance=variance,
        beta=float(gaussian.mean[n]) if fit_bias else 0.0,
        beta_variance=float(gaussian.covariance[n, n]) if fit_bias else 0.0,
        prior_variance=prior_variance,
        reliability=_clamp(signal / (signal + noise), 0.0, 1.0) if signal > 0 else 0.0,
    )


def _site_posterior(
    edges: _Edges,
    n: int,
    site_precision: FloatArray,
    site_shift: FloatArray,
    *,
    prior_variance: float,
    fit_bias: bool,
) -> _Gaussian:
    """Prior times Gaussian sites: precision Hᵀ diag(τ̃) H + prior, shift Hᵀ ν̃, with H the
    edge rows e_a − e_b (+ e_β)."""
    size = n + 1 if fit_bias else n
    precision = _dense_precision(edges, site_precision, n, 1.0 / prior_variance, size=size)
    shift = np.zeros(size)
    shift[:n] = np.bincount(edges.a, site_shift, n) - np.bincount(edges.b, site_shift, n)
    if fit_bias:
        coupling = _bias_coupling(edges, site_precision, n)
        precision[n, :n] = coupling  # the lower triangle is all LAPACK reads
        precision[n, n] = site_precision.sum() + _BETA_RIDGE
        shift[n] = site_shift.sum()
    lower = _cholesky(precision)
    mean = _cholesky_solve(lower, shift)
    covariance, info = linalg.lapack.dpotri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError("posterior precision is not positive definite")
    a, b = edges.a, edges.b
    edge_mean = mean[a] - mean[b]
    between = covariance[np.maximum(a, b), np.minimum(a, b)]
    diagonal = np.diag(covariance)
    edge_variance = diagonal[a] + diagonal[b] - 2.0 * between
    if fit_bias:
        edge_mean = edge_mean + mean[n]
        edge_variance = edge_variance + diagonal[n] + 2.0 * (covariance[n, a] - covariance[n, b])
    return _Gaussian(mean, covariance, edge_mean, np.maximum(edge_variance, 1e-12))


def _update_prior_variance(
    gaussian: _Gaussian, n: int, prior_variance: float
) -> tuple[float, float]:
    """Next τ² on the way to the type-II maximum-likelihood condition τ² = F(τ²),
    F(τ²) = (‖E θ‖² + tr Cov θ) / n (at an EP fixed point the sites' dependence on τ² drops
    out of the gradient, so this is the stationarity condition of the EP evidence), and an
    estimate of how far τ² still is from it (in log τ²).

    The EM step τ² ← F(τ²) contracts the distance by F'·τ²/F per sweep. That is fast when
    the judgements are informative, but crawls when they are not (F' near 1); then a Newton
    step on g(log τ²) = log F − log τ² is taken instead, with F' from the current sites
    held fixed (dCov/dτ² = Cov²/τ⁴, dE/dτ² = Cov E/τ⁴). Newton is not used throughout
    because F' ignores how the sites follow τ², which makes it overshoot while they settle.
    """
    target, contraction = _prior_fixed_point(gaussian, n, prior_variance)
    gap = math.log(max(target, _MIN_PRIOR_VARIANCE) / prior_variance)
    step = gap if contraction < _EM_CRAWL else gap / (1.0 - contraction)
    step = _clamp(step, -_PRIOR_MAX_LOG_STEP, _PRIOR_MAX_LOG_STEP)
    updated = _clamp(prior_variance * math.exp(step), _MIN_PRIOR_VARIANCE, _MAX_PRIOR_VARIANCE)
    return updated, abs(gap) / (1.0 - contraction)


def _prior_fixed_point(gaussian: _Gaussian, n: int, prior_variance: float) -> tuple[float, float]:
    """F(τ²) = (‖E θ‖² + tr Cov θ) / n and the contraction F'·τ²/F of the EM step, with F'
    from the current sites held fixed (dCov/dτ² = Cov²/τ⁴, dE/dτ² = Cov E/τ⁴)."""
    mean = np.zeros(gaussian.mean.size)
    mean[:n] = gaussian.mean[:n]
    diagonal = np.diag(gaussian.covariance)[:n]
    target = (float(mean @ mean) + float(diagonal.sum())) / n
    block = gaussian.covariance[:n, :n]  # lower triangle
    squares = 2.0 * float(np.einsum("ij,ij->", block, block)) - float(diagonal @ diagonal)
    quadratic = float(mean @ gaussian.symmetric_product(mean))
    derivative = (2.0 * quadratic + squares) / (n * prior_variance**2)
    contraction = _clamp(derivative * prior_variance / target, 0.0, 1.0 - 1e-3)
    return target, contraction


def _tilted_moments(
    edges: _Edges, cavity_mean: FloatArray, cavity_variance: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Mean and variance of σ(x)^wins σ(−x)^losses · N(x; cavity) by Gauss–Hermite quadrature.

    The moments are taken in standard units of the cavity, x = m + s·z, so the three sums
    over the nodes are one matrix product each: E z = Σ wᵢ Lᵢ zᵢ / Σ wᵢ Lᵢ, and so on.
    Most edges hold one judgement, whose likelihood is a single σ(±x); the others are
    weighted in log space, shifted by their largest node so that none underflows.
    """
    spread = np.sqrt(cavity_variance)
    points = cavity_mean[:, None] + spread[:, None] * _HERMITE_NODES[None, :]
    sign = np.where(edges.a_wins > 0.0, 1.0, -1.0)
    likelihood = expit(points * sign[:, None])
    others = np.flatnonzero(edges.total != 1.0)
    if others.size:
        likelihood[others] = _shifted_likelihood(edges, others, points[others])
    total = likelihood @ _HERMITE_WEIGHTS
    # A single σ(±x) underflows only with the whole cavity hundreds of logits on its
    # losing side; those rows are weighted in log space too.
    if not total.min() > 1e-280:
        lost = np.flatnonzero(~(total > 1e-280))
        likelihood[lost] = _shifted_likelihood(edges, lost, points[lost])
        total[lost] = likelihood[lost] @ _HERMITE_WEIGHTS
    first = (likelihood @ _HERMITE_FIRST) / total
    second = (likelihood @ _HERMITE_SECOND) / total
    mean = cavity_mean + spread * first
    return mean, np.maximum(cavity_variance * (second - first * first), 1e-12)


def _shifted_likelihood(edges: _Edges, rows: IntArray, points: FloatArray) -> FloatArray:
    """σ(x)^wins σ(−x)^losses of the given edges at their nodes, up to a factor per row."""
    # log σ(−x) = log σ(x) − x: one log-sigmoid for both outcomes.
    log_likelihood = edges.total[rows, None] * log_expit(points)
    log_likelihood -= (edges.total[rows] - edges.a_wins[rows])[:, None] * points
    log_likelihood -= log_likelihood.max(axis=1, keepdims=True)
    return np.exp(log_likelihood)


def _clamp(value: float, low: float, high: float) -> float:
    """A scalar clip (numpy's costs microseconds, and EP takes several per sweep)."""
    return float(min(max(value, low), high))


def _cholesky(matrix: FloatArray) -> FloatArray:
    lower, info = linalg.lapack.dpotrf(matrix, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError("posterior precision is not positive definite")
    return lower


def _cholesky_solve(lower: FloatArray, rhs: FloatArray) -> FloatArray:
    """Solve with a factor from `_cholesky` (LAPACK directly: the factor is known finite, and
    at small scales scipy's checks cost more than the solve)."""
    solution, info = linalg.lapack.dpotrs(lower, rhs, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError("invalid Cholesky solve")
    return np.asarray(solution)


def _encode_judgements(
    judgements: Iterable[tuple[str, str, bool]], index: dict[str, int]
) -> tuple[IntArray, IntArray, NDArray[np.bool_]]:
    shown_a: list[int] = []
    shown_b: list[int] = []
    a_won: list[bool] = []
    for essay_a, essay_b, won in judgements:
        if essay_a == essay_b:
            raise ValueError(f"essay {essay_a!r} cannot be compared with itself")
        try:
            shown_a.append(index[essay_a])
            shown_b.append(index[essay_b])
        except KeyError as error:
            raise ValueError(f"judgement refers to unknown essay {error.args[0]!r}") from None
        a_won.append(bool(won))
    return (
        np.asarray(shown_a, dtype=np.intp),
        np.asarray(shown_b, dtype=np.intp),
        np.asarray(a_won, dtype=bool),
    )


def _aggregate_edges(
    shown_a: IntArray, shown_b: IntArray, a_won: NDArray[np.bool_], n: int
) -> _Edges:
    """Collapse repeated judgements so each iteration costs O(distinct ordered pairs)."""
    codes, inverse = np.unique(shown_a * n + shown_b, return_inverse=True)
    inverse = inverse.ravel()
    a = (codes // n).astype(np.intp)
    b = (codes % n).astype(np.intp)
    pair_codes, pair = np.unique(np.minimum(a, b) * n + np.maximum(a, b), return_inverse=True)
    return _Edges(
        a=a,
        b=b,
        total=np.bincount(inverse).astype(float),
        a_wins=np.bincount(inverse, weights=a_won.astype(float)).astype(float),
        pair=pair.ravel().astype(np.intp),
        low=(pair_codes // n).astype(np.intp),
        high=(pair_codes % n).astype(np.intp),
    )


def _log_posterior(
    edges: _Edges, theta: FloatArray, beta: float, ridge: float, beta_ridge: float
) -> float:
    diff = theta[edges.a] - theta[edges.b] + beta
    b_wins = edges.total - edges.a_wins
    log_likelihood = -(edges.a_wins @ np.logaddexp(0.0, -diff) + b_wins @ np.logaddexp(0.0, diff))
    return float(log_likelihood - 0.5 * ridge * (theta @ theta) - 0.5 * beta_ridge * beta * beta)


def _pair_information(edges: _Edges, fit: _Fit) -> FloatArray:
    """Per-pair Fisher information n_ab · p_ab · (1 − p_ab)."""
    p = expit(fit.theta[edges.a] - fit.theta[edges.b] + fit.beta)
    return edges.total * p * (1.0 - p)


def _information_diagonal(edges: _Edges, weight: FloatArray, n: int) -> FloatArray:
    diagonal = np.bincount(edges.a, weight, n) + np.bincount(edges.b, weight, n)
    return diagonal.astype(float, copy=False)


def _bias_coupling(edges: _Edges, weight: FloatArray, n: int) -> FloatArray:
    """Information shared by θ_i and β: + for showings as Essay A, − for showings as B."""
    coupling = np.bincount(edges.a, weight, n) - np.bincount(edges.b, weight, n)
    return coupling.astype(float, copy=False)


def _dense_precision(
    edges: _Edges, weight: FloatArray, n: int, ridge: float, *, size: int | None = None
) -> FloatArray:
    """Fisher information of the abilities plus ``ridge * I`` as a dense matrix.

    With ``size`` > n the matrix is embedded in a larger zero one (room for β).
    """
    pair_weight = np.bincount(edges.pair, weight, edges.low.size)  # both orientations
    matrix = np.zeros((size or n, size or n), order="F")
    matrix[edges.low, edges.high] = -pair_weight
    matrix[edges.high, edges.low] = -pair_weight
    diagonal = np.arange(n)
    matrix[diagonal, diagonal] = _information_diagonal(edges, weight, n) + ridge
    return matrix


def _precision_solver(
    edges: _Edges, weight: FloatArray, diagonal: FloatArray
) -> Callable[[FloatArray], FloatArray]:
    """Solves with the ability precision matrix (information ``weight`` per edge, the given
    ``diagonal``), for the right-hand sides of one Newton step.

    Small scales factorise it once: one dense factorisation beats dozens of conjugate-gradient
    iterations of numpy calls, and most assessments are this small.
    """
    n = diagonal.size
    if n <= _DENSE_SOLVE_MAX_ESSAYS:
        matrix = _dense_precision(edges, weight, n, 0.0)
        matrix[np.arange(n), np.arange(n)] = diagonal
        lower = _cholesky(matrix)
        return lambda rhs: _cholesky_solve(lower, rhs)
    return lambda rhs: _conjugate_gradients(edges, weight, diagonal, rhs)


def _conjugate_gradients(
    edges: _Edges, weight: FloatArray, diagonal: FloatArray, rhs: FloatArray
) -> FloatArray:
    """Jacobi-preconditioned conjugate gradients on the sparse precision matrix.

    The matrix is a weighted graph Laplacian plus a positive ridge, so it is symmetric
    positive definite and each product costs O(distinct pairs); this keeps Newton steps
    cheap for thousands of essays where dense factorisations would dominate.
    """
    n = rhs.size
    solution = np.zeros(n)
    residual = rhs.copy()
    preconditioned = residual / diagonal
    direction = preconditioned.copy()
    rz = residual @ preconditioned
    target = _CG_TOLERANCE * np.linalg.norm(rhs)
    for _ in range(max(_CG_MIN_ITERATIONS, 4 * n)):
        if np.linalg.norm(residual) <= target:
            break
        product = (
            diagonal * direction
            - np.bincount(edges.a, weight * direction[edges.b], n)
            - np.bincount(edges.b, weight * direction[edges.a], n)
        )
        step = rz / (direction @ product)
        solution += step * direction
        residual -= step * product
        preconditioned = residual / diagonal
        rz_next = residual @ preconditioned
        direction = preconditioned + (rz_next / rz) * direction
        rz = rz_next
    return solution


def _fit(
    edges: _Edges,
    n: int,
    *,
    ridge: float,
    fit_bias: bool,
    beta_ridge: float = _BETA_RIDGE,
    start: _Fit | None = None,
) -> _Fit:
    """Damped Newton ascent of the (strictly concave) log-posterior in (θ, β).

    The Newton system [[L, c], [cᵀ, d]] · (Δθ, Δβ) = (g_θ, g_β) is solved through the Schur
    complement of the sparse ability block L, so β costs one extra CG solve per step.
    Without ``fit_bias``, β stays where ``start`` put it (0 without a start).
    """
    theta = np.zeros(n) if start is None else start.theta.copy()
    beta = 0.0 if start is None else start.beta
    current = _log_posterior(edges, theta, beta, ridge, beta_ridge)
    for _ in range(_MAX_NEWTON_ITERATIONS):
        p = expit(theta[edges.a] - theta[edges.b] + beta)
        residual = edges.a_wins - edges.total * p
        gradient = (
            np.bincount(edges.a, residual, n) - np.bincount(edges.b, residual, n) - ridge * theta
        )
        beta_gradient = float(residual.sum() - beta_ridge * beta) if fit_bias else 0.0
        if max(np.max(np.abs(gradient)), abs(beta_gradient)) < _GRADIENT_TOLERANCE:
            break
        weight = edges.total * p * (1.0 - p)
        diagonal = _information_diagonal(edges, weight, n) + ridge
        solve = _precision_solver(edges, weight, diagonal)
        step = solve(gradient)
        beta_step = 0.0
        if fit_bias:
            coupling = _bias_coupling(edges, weight, n)
            through = solve(coupling)
            schur = float(weight.sum() + beta_ridge - coupling @ through)
            beta_step = (beta_gradient - float(coupling @ step)) / schur
            step = step - through * beta_step
        fraction = 1.0
        while fraction > _MIN_STEP_FRACTION:
            candidate = theta + fraction * step
            candidate_beta = beta + fraction * beta_step
            value = _log_posterior(edges, candidate, candidate_beta, ridge, beta_ridge)
            if value >= current:
                break
            fraction /= 2.0
        else:
            break
        theta, beta, current = candidate, candidate_beta, value
        if max(np.max(np.abs(fraction * step)), abs(fraction * beta_step)) < _STEP_TOLERANCE:
            break
    return _Fit(theta=theta - theta.mean(), beta=float(beta))


def _posterior(
    edges: _Edges, fit: _Fit, *, ridge: float, fit_bias: bool, beta_ridge: float = _BETA_RIDGE
) -> _Posterior:
    """diag(P · Σ_θθ · P) with P the centring projection, and Var(β).

    Σ_θθ = M⁻¹ + u uᵀ / s with M the ability precision, u = M⁻¹c and s = d − cᵀu the Schur
    complement of β: estimating β adds a little uncertainty to essays shown mostly one way.
    """
    n = fit.theta.size
    weight = _pair_information(edges, fit)
    lower = _cholesky(_dense_precision(edges, weight, n, ridge))
    inverse_lower, info = linalg.lapack.dtrtri(lower, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError("posterior precision is not positive definite")
    covariance_diagonal = np.einsum("ij,ij->j", inverse_lower, inverse_lower)
    covariance_row_sums = _cholesky_solve(lower, np.ones(n))
    variance = (
        covariance_diagonal - 2.0 * covariance_row_sums / n + covariance_row_sums.sum() / (n * n)
    )
    beta_variance = 0.0
    if fit_bias:
        coupling = _bias_coupling(edges, weight, n)
        through = _cholesky_solve(lower, coupling)
        schur = float(weight.sum() + beta_ridge - coupling @ through)
        beta_variance = 1.0 / schur
        centred = through - through.mean()
        variance = variance + centred**2 / schur
    return _Posterior(theta_variance=np.maximum(variance, 0.0), beta_variance=beta_variance)


def _ranked_essays(
    ids: list[str],
    scores: FloatArray,
    standard_errors: FloatArray,
    wins: IntArray,
    losses: IntArray,
) -> tuple[EssayScore, ...]:
    # Ordered by the score as published (6 decimals): scores that are equal in theory differ
    # in their last bits, and those bits must not decide a rank; the essay id does.
    order = sorted(
        range(len(ids)),
        key=lambda k: (-round(float(scores[k]), 6), wins[k] + losses[k] == 0, ids[k]),
    )
    return tuple(
        EssayScore(
            essay_id=ids[k],
            score=float(scores[k]),
            standard_error=float(standard_errors[k]),
            rank=rank,
            comparison_count=int(wins[k] + losses[k]),
            wins=int(wins[k]),
            losses=int(losses[k]),
        )
        for rank, k in enumerate(order, start=1)
    )
