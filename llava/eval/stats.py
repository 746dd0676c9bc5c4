"""Which differences in the comparison table are real: intervals and paired tests over questions.

Every function takes per-question scores (question id -> score, in the benchmark's units, e.g. 0/100 for an
exact-match accuracy x 100), so a benchmark's headline score is their mean. Notation: ``x_i`` the row's
score on question ``i``, ``y_i`` the baseline's on the same question, ``n`` the number of questions, ``R``
the number of bootstrap resamples, ``alpha`` the level (0.05: 95 % intervals).

- :func:`bootstrap_ci`: percentile bootstrap interval of the mean over questions.
- :func:`paired_test`: exact McNemar test when both vectors are binary, else a paired bootstrap test.
- :func:`retained_ci`: interval of the average % retained over benchmarks (paired bootstrap per benchmark).
- :func:`seed_summary`: mean, sample standard deviation and range of a score over evaluation seeds.

Resampling is vectorised with numpy (an ``(R, n)`` index matrix, built in blocks to bound memory) and seeded
with ``numpy.random.default_rng(seed)``, so the same inputs and seed give the same numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

N_RESAMPLES = 2000
"""Default number of bootstrap resamples."""
ALPHA = 0.05
"""Default level: 95 % intervals, differences with ``p < 0.05`` significant."""
_BLOCK_ELEMENTS = 1 << 23
"""Most index entries drawn at once (8 M int64 = 64 MiB); more resamples are drawn block by block."""


def align(row: Mapping[str, float], baseline: Mapping[str, float], what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: the two rows' scores on the same questions, matched by question id (sorted ids).

    ValueError when the rows do not cover the same questions, naming how many each lacks and a few ids.
    """
    missing_in_row = sorted(set(baseline) - set(row))
    missing_in_baseline = sorted(set(row) - set(baseline))
    if missing_in_row or missing_in_baseline:
        where = f"{what}: " if what else ""
        raise ValueError(
            f"{where}the rows do not cover the same questions: {len(missing_in_row)} of the baseline's are missing "
            f"from the row (first: {missing_in_row[:3]}), {len(missing_in_baseline)} of the row's from the baseline "
            f"(first: {missing_in_baseline[:3]}); evaluate both on the same questions (same data, same --limit)"
        )
    ids = sorted(row)
    return (
        np.asarray([row[key] for key in ids], dtype=np.float64),
        np.asarray([baseline[key] for key in ids], dtype=np.float64),
    )


def _as_vector(scores: Mapping[str, float] | Sequence[float] | np.ndarray) -> np.ndarray:
    vector = np.asarray(list(scores.values()) if isinstance(scores, Mapping) else scores, dtype=np.float64)
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"expected a non-empty vector of per-question scores, got shape {vector.shape}")
    return vector


def _index_blocks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The ``(R, n)`` matrix of resampled question indices (uniform, with replacement), in row blocks."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n_resamples, rows_per_block):
        yield rng.integers(0, n, size=(min(rows_per_block, n_resamples - start), n))


def bootstrap_means(
    scores: Mapping[str, float] | Sequence[float] | np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> np.ndarray:
    """The ``R`` bootstrap means ``m*_r = (1/n) sum_j x[I_rj]`` with ``I_rj`` uniform on ``{0..n-1}``."""
    vector = _as_vector(scores)
    return np.concatenate([vector[index].mean(axis=1) for index in _index_blocks(vector.size, n_resamples, seed)])


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    low, high = np.nanquantile(values, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    scores: Mapping[str, float] | Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    alpha: float = ALPHA,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` interval of the mean score over questions.

    ``[q_{alpha/2}(m*), q_{1-alpha/2}(m*)]``, the empirical quantiles (numpy's linear interpolation) of the
    ``R`` resampled means ``m*_r`` of :func:`bootstrap_means`. For 0/1 scores and large ``n`` it approaches
    the normal interval ``p +- z_{1-alpha/2} sqrt(p (1 - p) / n)``.
    """
    return _percentile_interval(bootstrap_means(scores, n_resamples, seed), alpha)


def is_binary(*vectors: np.ndarray) -> bool:
    """Whether every value is ``0`` or one common positive value ``top`` (0/1, or 0/100 for accuracy x 100)."""
    values = np.unique(np.concatenate([np.asarray(vector, dtype=np.float64) for vector in vectors]))
    return values.size <= 2 and values[0] >= 0 and (values.size == 1 or values[0] == 0)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    Under the null a discordant pair goes either way with probability 1/2, so with ``m = b + c`` and
    ``k = min(b, c)``: ``p = min(1, 2 * sum_{i=0..k} C(m, i) / 2^m)`` (``p = 1`` when ``m = 0``); computed
    with exact integers.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**m)


def paired_bootstrap_p(x: np.ndarray, y: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired bootstrap p-value of the mean difference ``D = mean(d)``, ``d_i = x_i - y_i``.

    The resampled means ``D*_r`` of ``d`` are centred on ``D`` to mimic the null (no difference):
    ``p = (1 + #{r : |D*_r - D| >= |D|}) / (R + 1)``, so identical vectors give ``p = 1`` and the smallest
    possible value is ``1 / (R + 1)``.
    """
    difference = _as_vector(x) - _as_vector(y)
    observed = float(difference.mean())
    centred = np.abs(bootstrap_means(difference, n_resamples, seed) - observed)
    extreme = int(np.count_nonzero(centred >= abs(observed) - 1e-12 * max(1.0, abs(observed))))
    return (1 + extreme) / (n_resamples + 1)


def paired_test(
    row: Mapping[str, float],
    baseline: Mapping[str, float],
    n_resamples: int = N_RESAMPLES,
    alpha: float = ALPHA,
    seed: int = 0,
    what: str = "",
) -> dict[str, Any]:
    """The row against the baseline on the same questions (matched by id, :func:`align`).

    Binary scores (:func:`is_binary`): exact McNemar (:func:`mcnemar_exact`) with ``b = #{x_i > y_i}`` and
    ``c = #{x_i < y_i}``; otherwise :func:`paired_bootstrap_p`. Returns ``method``, ``p_value``,
    ``significant`` (``p < alpha``), ``n``, ``difference`` (``mean(x - y)``) and, for McNemar, ``discordant``
    ``[b, c]``.
    """
    x, y = align(row, baseline, what)
    result: dict[str, Any] = {"n": int(x.size), "difference": float((x - y).mean())}
    if is_binary(x, y):
        b, c = int(np.count_nonzero(x > y)), int(np.count_nonzero(x < y))
        result.update(method="mcnemar_exact", p_value=mcnemar_exact(b, c), discordant=[b, c])
    else:
        result.update(method="paired_bootstrap", p_value=paired_bootstrap_p(x, y, n_resamples, seed))
    result["significant"] = result["p_value"] < alpha
    return result


def retained_ci(
    pairs: Sequence[tuple[Mapping[str, float], Mapping[str, float]]],
    n_resamples: int = N_RESAMPLES,
    alpha: float = ALPHA,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the average % retained over benchmarks; ``pairs`` = ``(row, baseline)`` scores
    per benchmark.

    Benchmark ``k`` is resampled over its own questions, the row and the baseline with the same indices
    (paired): ``ret*_rk = 100 * mean(x_k[I_rk]) / mean(y_k[I_rk])``; the statistic is the table's average
    ``A*_r = (1/K) sum_k ret*_rk`` and the interval ``[q_{alpha/2}(A*), q_{1-alpha/2}(A*)]`` (resamples whose
    baseline mean is 0 are left out). Benchmark ``k`` (0-based, in order) draws with seed ``seed + k``.
    """
    if not pairs:
        raise ValueError("retained_ci needs at least one benchmark")
    total = np.zeros(n_resamples)
    for number, (row, baseline) in enumerate(pairs):
        x, y = align(row, baseline, f"benchmark {number}")
        ratios = []
        for index in _index_blocks(x.size, n_resamples, seed + number):
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios.append(100.0 * x[index].mean(axis=1) / y[index].mean(axis=1))
        ratio = np.concatenate(ratios)
        total += np.where(np.isfinite(ratio), ratio, np.nan)
    return _percentile_interval(total / len(pairs), alpha)


def seed_summary(per_seed: Mapping[int, float]) -> dict[str, Any]:
    """Mean, sample standard deviation ``s = sqrt(sum_j (v_j - mean)^2 / (S - 1))`` (``None`` for one seed),
    ``min``, ``max`` and the ``values`` (seed -> score) of a score over ``S`` evaluation seeds."""
    if not per_seed:
        raise ValueError("seed_summary needs at least one seed's score")
    values = [float(value) for value in per_seed.values()]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "values": {str(seed): float(value) for seed, value in per_seed.items()},
    }


def mean_over_seeds(per_seed: Sequence[Mapping[str, float]], what: str = "") -> dict[str, float]:
    """Per-question scores averaged over seeds (``(1/S) sum_s x_si``); the seeds must cover the same questions."""
    if not per_seed:
        raise ValueError("mean_over_seeds needs at least one seed")
    first = per_seed[0]
    for other in per_seed[1:]:
        align(other, first, what)
    return {key: statistics.fmean(scores[key] for scores in per_seed) for key in first}
