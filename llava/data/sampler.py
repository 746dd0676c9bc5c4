"""Length- and modality-grouped sampling (LLaVA's ``group_by_modality_length``), deterministic.

Image and text-only samples go to separate megabatches (``batch_size * world_size`` samples), so
a step never pads short text-only samples up to image-sized ones; within a megabatch samples are
sorted by length and dealt to ranks so every rank gets similar work. Megabatch order is shuffled.
As in LLaVA, the leftovers of both modalities form one final mixed megabatch. Unlike LLaVA the
whole order is drawn from one seeded generator, so it is reproducible from ``(seed, epoch)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def _deal_to_ranks(megabatches: np.ndarray, lengths: np.ndarray, world_size: int) -> np.ndarray:
    """Sort each row longest-first, then deal it to ranks in snake order (0..w-1, w-1..0, ...)
    and lay the row out rank by rank, so consecutive ``batch_size`` chunks are per-rank batches."""
    size = megabatches.shape[1]
    order = np.argsort(-lengths[megabatches], axis=1, kind="stable")
    ranked = np.take_along_axis(megabatches, order, axis=1)
    position = np.arange(size)
    round_index, offset = np.divmod(position, world_size)
    rank = np.where(round_index % 2 == 0, offset, world_size - 1 - offset)
    per_rank = size // world_size
    destination = rank * per_rank + round_index
    dealt = np.empty_like(ranked)
    dealt[:, destination] = ranked
    return dealt


def modality_length_grouped_indices(
    lengths: Sequence[int] | np.ndarray, batch_size: int, world_size: int, rng: np.random.Generator
) -> np.ndarray:
    """One epoch's order: positive lengths are multimodal samples, negative ones text-only."""
    signed = np.asarray(lengths, dtype=np.int64)
    if np.any(signed == 0):
        raise ValueError("lengths must be non-zero (positive: with images, negative: text-only)")
    magnitude = np.abs(signed)
    megabatch_size = batch_size * world_size
    full_megabatches: list[np.ndarray] = []
    leftovers: list[np.ndarray] = []
    for members in (np.flatnonzero(signed > 0), np.flatnonzero(signed < 0)):
        shuffled = members[rng.permutation(len(members))]
        num_full = len(shuffled) // megabatch_size
        rows = shuffled[: num_full * megabatch_size].reshape(num_full, megabatch_size)
        full_megabatches.append(_deal_to_ranks(rows, magnitude, world_size))
        leftovers.append(shuffled[num_full * megabatch_size :])
    megabatches = np.concatenate(full_megabatches, axis=0)
    megabatches = megabatches[rng.permutation(len(megabatches))]
    tail = np.concatenate(leftovers)
    tail = tail[np.argsort(-magnitude[tail], kind="stable")]
    return np.concatenate([megabatches.reshape(-1), tail])


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yield dataset indices grouped by modality and length; call :meth:`set_epoch` every epoch."""

    def __init__(self, batch_size: int, world_size: int, lengths: Sequence[int] | np.ndarray, seed: int = 0) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be positive")
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, rng)
        return iter(order.tolist())
