"""Which differences in the comparison table are real: intervals and paired tests over questions.

Every function takes per-question scores (question id -> score, in the benchmark's units, e.g. 0/100 for an
exact-match accuracy x 100), so a benchmark's headline score is their mean. Notation: ``x_i`` the row's
score on question ``i``, ``y_i`` the baseline's on the same question, ``n`` the number of questions, ``R``
the number of bootstrap resamples, ``alpha`` the level (0.05: 95 % intervals).

- :func:`bootstrap_ci`: percentile bootstrap interval of the mean over questions.
- :func:`paired_test`: exact McNemar test when both vectors are binary, else a paired bootstrap test.
- :func:`retained_ci`: interval of the average % retained over benchmarks (paired bootstrap per benchmark).
- :func:`seed_summary`: mean, sample standard deviation and range of a score over evaluation seeds.
- :func:`unit_resamples`, :func:`unit_paired_bootstrap_p`: the same on a benchmark's own units (below).

Headlines that are not a mean over questions (POPE's F1, MME's sums of acc and acc+, MMBench's circular
accuracy) are resampled on the benchmark's own units instead (:class:`UnitStatistic`): unit ``u`` carries a
statistics vector ``v_u`` (counts such as TP/FP/FN per split), the headline is ``H = h(sum_u v_u)``, and a
resample with unit counts ``c_r`` gives ``H*_r = h(sum_u c_ru v_u)``, optionally within strata that each
keep their size. :func:`bootstrap_ci`, :func:`paired_test` and :func:`retained_ci` accept one in place of
per-question scores.

Resampling is vectorised with numpy (an ``(R, n)`` index matrix, built in blocks to bound memory) and seeded
with ``numpy.random.default_rng(seed)``, so the same inputs and seed give the same numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

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
    _check_same_ids(row, baseline, what, "questions")
    ids = sorted(row)
    return (
        np.asarray([row[key] for key in ids], dtype=np.float64),
        np.asarray([baseline[key] for key in ids], dtype=np.float64),
    )


def _check_same_ids(
    row: Sequence[str] | Mapping[str, Any], baseline: Sequence[str] | Mapping[str, Any], what: str, noun: str
) -> None:
    """ValueError when two rows' ids (questions, or ``noun``) differ, naming how many each lacks and a few ids."""
    missing_in_row = sorted(set(baseline) - set(row))
    missing_in_baseline = sorted(set(row) - set(baseline))
    if missing_in_row or missing_in_baseline:
        where = f"{what}: " if what else ""
        raise ValueError(
            f"{where}the rows do not cover the same {noun}: {len(missing_in_row)} of the baseline's are missing "
            f"from the row (first: {missing_in_row[:3]}), {len(missing_in_baseline)} of the row's from the baseline "
            f"(first: {missing_in_baseline[:3]}); evaluate both on the same questions (same data, same --limit)"
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


@dataclass(frozen=True, eq=False)
class UnitStatistic:
    """A benchmark's headline recomputed from sums over its resampling units: ``H = h(sum_u v_u)``.

    ``ids``: the ``n`` unit ids (unique; e.g. questions, images, question groups). ``values``: the per-unit
    statistics ``v_u``, shape ``(n, k)``, or ``(S, n, k)`` for ``S`` evaluation seeds, where
    ``H = (1/S) sum_s h(sum_u v_su)``. ``headline``: ``h``, vectorised, summed statistics ``(R, k)`` ->
    headlines ``(R,)``; ``None`` for a plain mean of per-unit scores (``k = 1``, ``h(t) = t / n``), which
    :func:`paired_test` compares like per-question scores (McNemar when they are right/wrong). ``strata``:
    each unit's stratum (resampling keeps every stratum's size), ``None`` for none. ``unit``, ``stratum``
    and ``description`` say in words what a unit and a stratum are and how the headline is recomputed.
    """

    ids: tuple[str, ...]
    values: np.ndarray
    headline: Callable[[np.ndarray], np.ndarray] | None = None
    strata: tuple[str, ...] | None = None
    unit: str = "question"
    stratum: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        values = values[None] if values.ndim == 2 else values
        ids = tuple(str(key) for key in self.ids)
        if values.ndim != 3 or values.shape[1] != len(ids) or not ids or values.shape[2] == 0:
            raise ValueError(f"expected (n, k) or (S, n, k) statistics for {len(ids)} units, got {values.shape}")
        if len(set(ids)) != len(ids):
            raise ValueError("unit ids must be unique")
        if self.headline is None and values.shape[2] != 1:
            raise ValueError(f"a plain mean needs one statistic per unit, got {values.shape[2]}")
        if self.strata is not None and len(self.strata) != len(ids):
            raise ValueError(f"{len(self.strata)} strata for {len(ids)} units")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "values", values)
        if self.strata is not None:
            object.__setattr__(self, "strata", tuple(str(name) for name in self.strata))

    def __len__(self) -> int:
        return len(self.ids)

    def evaluate(self, sums: np.ndarray) -> np.ndarray:
        """Headlines ``(R,)`` of summed statistics ``(S, R, k)``: ``(1/S) sum_s h(sums_s)``."""
        layers, rows, k = sums.shape
        if self.headline is None:
            return sums[..., 0].mean(axis=0) / len(self)
        headlines = np.asarray(self.headline(sums.reshape(layers * rows, k)), dtype=np.float64)
        return headlines.reshape(layers, rows).mean(axis=0)

    def value(self) -> float:
        """The full-sample headline ``H`` (every unit once)."""
        return float(self.evaluate(self.values.sum(axis=1)[:, None, :])[0])

    def scores(self) -> dict[str, float]:
        """Unit id -> per-unit score averaged over seeds (only for a plain mean, ``headline=None``)."""
        if self.headline is not None:
            raise ValueError("per-unit scores exist only for a plain mean (headline=None)")
        return {key: float(score) for key, score in zip(self.ids, self.values[:, :, 0].mean(axis=0), strict=True)}

    def in_id_order(self) -> UnitStatistic:
        """The same statistic with its units sorted by id (how rows are paired and resampled)."""
        order = sorted(range(len(self)), key=self.ids.__getitem__)
        strata = None if self.strata is None else tuple(self.strata[i] for i in order)
        return replace(self, ids=tuple(self.ids[i] for i in order), values=self.values[:, order], strata=strata)

    @staticmethod
    def over_seeds(per_seed: Sequence[UnitStatistic], what: str = "") -> UnitStatistic:
        """One statistic per seed stacked into ``(S, n, k)`` values: ``H = (1/S) sum_s h(sum_u v_su)``, the mean
        of the seeds' headlines, resampled with the same units for every seed."""
        if not per_seed:
            raise ValueError("over_seeds needs at least one seed")
        first = per_seed[0].in_id_order()
        layers = [first.values]
        for other in per_seed[1:]:
            _, aligned = align_units(first, other, what)
            if aligned.values.shape[2] != first.values.shape[2]:
                raise ValueError(f"{what}: the seeds' statistics differ in shape")
            layers.append(aligned.values)
        return replace(first, values=np.concatenate(layers))


Scores: TypeAlias = Mapping[str, float] | UnitStatistic
"""Per-question scores (question id -> score), or a benchmark's :class:`UnitStatistic`."""


def align_units(row: UnitStatistic, baseline: UnitStatistic, what: str = "") -> tuple[UnitStatistic, UnitStatistic]:
    """Both statistics in id order, after checking they cover the same units in the same strata (ValueError
    naming how many ids each lacks, as :func:`align` does)."""
    where = f"{what}: " if what else ""
    if not isinstance(row, UnitStatistic) or not isinstance(baseline, UnitStatistic):
        raise TypeError(f"{where}a benchmark's units pair only with the same benchmark's units")
    _check_same_ids(row.ids, baseline.ids, what, f"{row.unit}s")
    row, baseline = row.in_id_order(), baseline.in_id_order()
    if row.strata != baseline.strata:
        raise ValueError(f"{where}the rows put the same {row.unit}s in different {row.stratum or 'strata'}")
    return row, baseline


def _stratified_index_blocks(strata: Sequence[str], n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Like :func:`_index_blocks`, but column ``j`` draws uniformly among the units of ``j``'s stratum, so
    every resample keeps each stratum's size (strata drawn in sorted order within a block)."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    names = np.asarray(strata)
    members = [np.flatnonzero(names == name) for name in sorted(set(strata))]
    rows_per_block = max(1, _BLOCK_ELEMENTS // names.size)
    for start in range(0, n_resamples, rows_per_block):
        rows = min(rows_per_block, n_resamples - start)
        index = np.empty((rows, names.size), dtype=np.int64)
        for member in members:
            index[:, member] = member[rng.integers(0, member.size, size=(rows, member.size))]
        yield index


def resample_counts(statistic: UnitStatistic, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Iterator[np.ndarray]:
    """Blocks of the ``(R, n)`` matrix ``c_ru``, how often resample ``r`` draws unit ``u`` (units in id order).

    Without strata the draws are :func:`_index_blocks`' (the same indices as :func:`bootstrap_means`), with
    strata :func:`_stratified_index_blocks`'; either way ``sum_u c_ru = n``.
    """
    n = len(statistic)
    if statistic.strata is None:
        blocks = _index_blocks(n, n_resamples, seed)
    else:
        blocks = _stratified_index_blocks(statistic.in_id_order().strata or (), n_resamples, seed)
    for index in blocks:
        rows = index.shape[0]
        flat = (index + n * np.arange(rows)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def unit_resamples(statistic: UnitStatistic, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """The ``R`` resampled headlines ``H*_r = h(sum_u c_ru v_u)`` (``c`` from :func:`resample_counts`)."""
    ordered = statistic.in_id_order()
    blocks = resample_counts(ordered, n_resamples, seed)
    return np.concatenate([ordered.evaluate(counts @ ordered.values) for counts in blocks])


def _paired_unit_resamples(
    row: UnitStatistic, baseline: UnitStatistic, n_resamples: int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(H*_row, H*_baseline)``, both ``(R,)``, each resample drawing the same units for the two rows."""
    x, y = align_units(row, baseline, what)
    blocks = resample_counts(x, n_resamples, seed)
    pairs = [(x.evaluate(counts @ x.values), y.evaluate(counts @ y.values)) for counts in blocks]
    return np.concatenate([first for first, _ in pairs]), np.concatenate([second for _, second in pairs])


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
    scores: Scores | Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    alpha: float = ALPHA,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` interval of the mean score over questions.

    ``[q_{alpha/2}(m*), q_{1-alpha/2}(m*)]``, the empirical quantiles (numpy's linear interpolation) of the
    ``R`` resampled means ``m*_r`` of :func:`bootstrap_means`. For 0/1 scores and large ``n`` it approaches
    the normal interval ``p +- z_{1-alpha/2} sqrt(p (1 - p) / n)``. For a :class:`UnitStatistic` the same
    quantiles of its resampled headlines ``H*_r`` (:func:`unit_resamples`).
    """
    if isinstance(scores, UnitStatistic):
        return _percentile_interval(unit_resamples(scores, n_resamples, seed), alpha)
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
    return _centred_p_value(bootstrap_means(difference, n_resamples, seed), observed)


def _centred_p_value(resampled: np.ndarray, observed: float) -> float:
    """``(1 + #{r : |D*_r - D| >= |D|}) / (R + 1)`` (ties within a relative 1e-12 count as extreme)."""
    centred = np.abs(resampled - observed)
    extreme = int(np.count_nonzero(centred >= abs(observed) - 1e-12 * max(1.0, abs(observed))))
    return (1 + extreme) / (resampled.size + 1)


def unit_paired_bootstrap_p(
    row: UnitStatistic, baseline: UnitStatistic, n_resamples: int = N_RESAMPLES, seed: int = 0, what: str = ""
) -> float:
    """Two-sided paired bootstrap p-value of the headline difference ``D = H(row) - H(baseline)``.

    Each resample draws the same units for both rows (matched by id, :func:`align_units`):
    ``D*_r = h(sum_u c_ru x_u) - h(sum_u c_ru y_u)``, and as in :func:`paired_bootstrap_p`
    ``p = (1 + #{r : |D*_r - D| >= |D|}) / (R + 1)``.
    """
    x, y = _paired_unit_resamples(row, baseline, n_resamples, seed, what)
    return _centred_p_value(x - y, row.value() - baseline.value())


def paired_test(
    row: Scores,
    baseline: Scores,
    n_resamples: int = N_RESAMPLES,
    alpha: float = ALPHA,
    seed: int = 0,
    what: str = "",
) -> dict[str, Any]:
    """The row against the baseline on the same questions (matched by id, :func:`align`).

    Binary scores (:func:`is_binary`): exact McNemar (:func:`mcnemar_exact`) with ``b = #{x_i > y_i}`` and
    ``c = #{x_i < y_i}``; otherwise :func:`paired_bootstrap_p`. Returns ``method``, ``p_value``,
    ``significant`` (``p < alpha``), ``n``, ``difference`` (``mean(x - y)``) and, for McNemar, ``discordant``
    ``[b, c]``. Two :class:`UnitStatistic`: plain means of per-unit scores as above over units (``unit``
    added); otherwise ``method`` ``paired_bootstrap_units`` (:func:`unit_paired_bootstrap_p`), ``n`` the
    units and ``difference`` the headline difference ``H(row) - H(baseline)``.
    """
    if isinstance(row, UnitStatistic) or isinstance(baseline, UnitStatistic):
        x_units, y_units = align_units(row, baseline, what)  # type: ignore[arg-type]
        if x_units.headline is None and y_units.headline is None:
            result = paired_test(x_units.scores(), y_units.scores(), n_resamples, alpha, seed, what)
            return {**result, "unit": x_units.unit}
        p_value = unit_paired_bootstrap_p(x_units, y_units, n_resamples, seed, what)
        return {"n": len(x_units), "unit": x_units.unit, "difference": x_units.value() - y_units.value(),
                "method": "paired_bootstrap_units", "p_value": p_value, "significant": p_value < alpha}  # fmt: skip
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
    pairs: Sequence[tuple[Scores, Scores]],
    n_resamples: int = N_RESAMPLES,
    alpha: float = ALPHA,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the average % retained over benchmarks; ``pairs`` = ``(row, baseline)`` scores
    per benchmark.

    Benchmark ``k`` is resampled over its own questions, the row and the baseline with the same indices
    (paired): ``ret*_rk = 100 * mean(x_k[I_rk]) / mean(y_k[I_rk])``; the statistic is the table's average
    ``A*_r = (1/K) sum_k ret*_rk`` and the interval ``[q_{alpha/2}(A*), q_{1-alpha/2}(A*)]`` (resamples whose
    baseline mean is 0 are left out). Benchmark ``k`` (0-based, in order) draws with seed ``seed + k``. A
    benchmark given as two :class:`UnitStatistic` is resampled on its units instead, paired the same way:
    ``ret*_rk = 100 * H*_r(row) / H*_r(baseline)`` (:func:`resample_counts`).
    """
    if not pairs:
        raise ValueError("retained_ci needs at least one benchmark")
    total = np.zeros(n_resamples)
    for number, (row, baseline) in enumerate(pairs):
        what = f"benchmark {number}"
        if isinstance(row, UnitStatistic) or isinstance(baseline, UnitStatistic):
            x_star, y_star = _paired_unit_resamples(row, baseline, n_resamples, seed + number, what)  # type: ignore[arg-type]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = 100.0 * (x_star / y_star)
        else:
            x, y = align(row, baseline, what)
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
