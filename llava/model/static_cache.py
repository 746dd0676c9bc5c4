"""Preallocated KV caches with one length per compression stage, for fixed-shape decode steps.

After a compressed prefill every stage (the layers between two T2V boundaries) holds its own number
of tokens, so each layer's cache is allocated at its stage's prefill length plus room for the new
tokens, rounded up to a bucket so that later prompts of similar length reuse the same buffers (and the
CUDA graphs captured on them). A decode step writes every layer's new key and value at its stage's
*write column*, a device tensor, so the step has no data-dependent shapes and no host synchronisation.
Unwritten columns are never attended to: the decode mask (:func:`llava.hf_adapter.decode_step_mask`)
covers only the prompt and the tokens written so far. The batch can be rounded up too
(``batch_capacity``): the prefill fills the real rows and decode steps run on all of them, so ragged last
batches of an evaluation reuse the buffers (and graphs) of full ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

CAPACITY_BUCKET = 128
"""Cache lengths are rounded up to a multiple of this, so prompts of similar length share buffers."""


def bucketed(length: int, bucket: int = CAPACITY_BUCKET) -> int:
    """``length`` rounded up to a multiple of ``bucket`` (at least one bucket)."""
    return max(bucket, math.ceil(length / bucket) * bucket)


def bucketed_batch(batch: int) -> int:
    """``batch`` rounded up to 1, 2, 4, 8, then a multiple of 8: few decode shapes for ragged batches, and at
    most 8 padded rows (decode steps of a batch up to 8 are bound by reading the weights, not by rows)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if batch <= 8:
        return 1 << (batch - 1).bit_length()
    return math.ceil(batch / 8) * 8


class StaticStageCache:
    """The KV cache the decoder layers write through ``update`` (the only cache method they call).

    Prefill (``decoding`` False): each layer stores its ``L`` prompt keys/values in columns ``[0, L)``
    of a buffer of length ``bucketed(L + reserve)`` and attends to the new keys only, exactly like a
    growing cache that starts empty. Decode: each layer writes one column, ``write_columns[stage]``, and
    attends over the whole buffer under the caller's mask.

    Buffers are kept per (layer, shape), so every captured decode graph keeps valid addresses until
    :meth:`retain` or :meth:`clear` drops them; they hold no sample data that outlives the next prefill of
    that shape. With ``batch_capacity`` above the batch, rows past it are padding the caller decodes along.
    """

    def __init__(self, stage_of_layer: Sequence[int], bucket: int = CAPACITY_BUCKET) -> None:
        self.stage_of_layer = list(stage_of_layer)
        self.bucket = bucket
        self.decoding = False
        self.reserve = 0
        self.batch_capacity: int | None = None
        self.write_columns: torch.Tensor | None = None
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._current: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.stage_of_layer)
        self._current_keys: list[tuple | None] = [None] * len(self.stage_of_layer)
        self.prefill_lengths = [0] * len(self.stage_of_layer)

    def begin_prefill(self, reserve: int, batch_capacity: int | None = None) -> None:
        """Start a new prompt batch whose layers will each hold ``reserve`` more tokens after the prefill, in
        buffers of ``batch_capacity`` rows (``None``: the batch's own size)."""
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0, got {reserve}")
        if batch_capacity is not None and batch_capacity < 1:
            raise ValueError(f"batch_capacity must be >= 1, got {batch_capacity}")
        self.decoding = False
        self.reserve = reserve
        self.batch_capacity = batch_capacity
        self.write_columns = None
        self._current = [None] * len(self.stage_of_layer)
        self._current_keys = [None] * len(self.stage_of_layer)
        self.prefill_lengths = [0] * len(self.stage_of_layer)

    def begin_decoding(self, write_columns: torch.Tensor) -> None:
        """Switch to decode steps; ``write_columns`` ``[num_stages]`` is read by every ``update``."""
        missing = [index for index, buffers in enumerate(self._current) if buffers is None]
        if missing:
            raise RuntimeError(f"layers {missing} were not run at the prefill; the static cache has no buffers")
        self.write_columns = write_columns
        self.decoding = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values; return what its attention should use."""
        if self.decoding:
            keys, values = self._current[layer_idx]
            column = self.write_columns[self.stage_of_layer[layer_idx]].view(1)
            keys.index_copy_(2, column, key_states)
            values.index_copy_(2, column, value_states)
            return keys, values
        batch, heads, length, _ = key_states.shape
        rows = batch if self.batch_capacity is None else self.batch_capacity
        if rows < batch:
            raise ValueError(f"a batch of {batch} does not fit the cache's batch capacity {rows}")
        capacity = bucketed(length + self.reserve, self.bucket)
        key = (layer_idx, rows, heads, capacity, key_states.shape[-1], value_states.shape[-1], key_states.dtype)
        buffers = self._buffers.get(key)
        if buffers is None or buffers[0].device != key_states.device:
            buffers = (
                key_states.new_zeros(rows, heads, capacity, key_states.shape[-1]),
                value_states.new_zeros(rows, heads, capacity, value_states.shape[-1]),
            )
            self._buffers[key] = buffers
        buffers[0][:batch, :, :length].copy_(key_states)
        buffers[1][:batch, :, :length].copy_(value_states)
        self._current[layer_idx] = buffers
        self._current_keys[layer_idx] = key
        self.prefill_lengths[layer_idx] = length
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Prompt tokens this layer stored at the prefill (0 before it)."""
        return self.prefill_lengths[layer_idx]

    def stage_capacities(self) -> tuple[int, ...]:
        """Buffer length of each stage (its first layer's; all layers of a stage hold the same tokens)."""
        first_layer = {}
        for layer, stage in enumerate(self.stage_of_layer):
            first_layer.setdefault(stage, layer)
        return tuple(self._current[first_layer[stage]][0].shape[2] for stage in sorted(first_layer))

    def layer_buffers(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's current key and value buffers ``[B, kv_heads, capacity, head_dim]``."""
        buffers = self._current[layer_idx]
        if buffers is None:
            raise RuntimeError(f"layer {layer_idx} has no buffers before a prefill")
        return buffers

    @property
    def num_buffer_shapes(self) -> int:
        """Distinct buffer sets held (for memory accounting)."""
        return len(self._buffers)

    def current_keys(self) -> frozenset[tuple]:
        """Keys of the buffer sets the current batch uses (what a decode graph of this batch captures)."""
        return frozenset(key for key in self._current_keys if key is not None)

    def nbytes(self, keys: Iterable[tuple] | None = None) -> int:
        """Bytes of the buffer sets ``keys`` (default: all held)."""
        chosen = self._buffers.keys() if keys is None else keys
        held = [self._buffers[key] for key in chosen if key in self._buffers]
        return sum(tensor.numel() * tensor.element_size() for buffers in held for tensor in buffers)

    def retain(self, keys: Iterable[tuple]) -> None:
        """Drop every buffer set but ``keys`` and the current batch's (graphs captured on dropped sets must go
        first)."""
        kept = set(keys) | self.current_keys()
        self._buffers = {key: buffers for key, buffers in self._buffers.items() if key in kept}

    @property
    def dtype(self) -> torch.dtype | None:
        """Dtype of the current buffers (``None`` before a prefill)."""
        first = self._current[0]
        return None if first is None else first[0].dtype

    def clear(self) -> None:
        """Release every buffer (invalidates graphs captured on them)."""
        self._buffers.clear()
        self._current = [None] * len(self.stage_of_layer)
        self._current_keys = [None] * len(self.stage_of_layer)
        self.decoding = False


def stage_of_each_layer(stage_starts: Sequence[int], num_layers: int) -> list[int]:
    """The stage index of every decoder layer, from the stages' first layers."""
    stages = []
    for layer in range(num_layers):
        stages.append(sum(1 for start in stage_starts if start <= layer) - 1)
    return stages
