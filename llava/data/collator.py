"""Collate dataset items into the padded batch the model consumes.

Batch contract:

- ``input_ids`` LongTensor ``[B, L]``, right-padded with ``pad_token_id``; one ``image_token_id``
  sentinel per image;
- ``labels`` LongTensor ``[B, L]``, IGNORE_INDEX on padding, prompts and sentinels;
- ``attention_mask`` LongTensor ``[B, L]``, 1 on real tokens, 0 on padding;
- ``pixel_values`` float ``[N_images, 3, H, W]``: every image of the batch in the order its
  sentinel occurs in row-major flattened ``input_ids``; absent when the batch has no image;
- ``pixel_values_videos`` float ``[N_videos, frames, 3, H, W]``: every video, in the same order
  among video sentinels; absent when the batch has no video (text, image and video samples mix freely);
- ``image_grid_thw`` / ``video_grid_thw`` LongTensor ``[N, 3]`` and ``second_per_grid_ts`` ``[N_videos]``
  (Qwen2.5-VL items): concatenated like the pixels, whose rows are then every image's (video's) patches;
- ``image_sizes`` LongTensor ``[N_images, 2]`` (LLaVA-NeXT items: each image's original height, width):
  concatenated like the pixels, whose rows are then every image's AnyRes views ``[sum views, 3, H, W]``;
- ``batch_num_images`` LongTensor ``[samples with images]`` (LLaVA-OneVision items: one row per sample, its
  number of images), concatenated in sample order;
- ``num_skipped_samples`` int, present when skip markers were dropped from the batch;
- ``sample_ids`` list of str, the items' ``sample_id`` (the data file's ``"id"``, or the index in the file),
  present when every item has one: the trainer pops it (and the above) before the model sees the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from llava.constants import IGNORE_INDEX
from llava.data.dataset import SkippedSample

CONCATENATED_KEYS = (
    "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "image_sizes",
    "batch_num_images",
)  # fmt: skip
"""Per-image (per-video) tensors: the batch holds every sample's, in order, along the first dimension."""


class AllSamplesSkippedError(ValueError):
    """Every sample of a batch was a skip marker: there is nothing to train on."""


class DataCollatorForSupervisedDataset:
    """Pad and stack :class:`~llava.data.dataset.LazySupervisedDataset` items; drop skip markers."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None, pad_token_id: int | None = None) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("need a pad_token_id (the tokenizer has none; pass pad_token_id=...)")
        self.pad_token_id = pad_token_id

    def __call__(self, instances: Sequence[dict[str, torch.Tensor] | SkippedSample]) -> dict[str, Any]:
        kept = [item for item in instances if not isinstance(item, SkippedSample)]
        num_skipped = len(instances) - len(kept)
        if not kept:
            reasons = "; ".join(item.reason for item in instances[:3])  # type: ignore[union-attr]
            raise AllSamplesSkippedError(f"all {len(instances)} samples of the batch were skipped: {reasons}")

        input_ids = pad_sequence(
            [item["input_ids"] for item in kept], batch_first=True, padding_value=self.pad_token_id
        )
        labels = pad_sequence([item["labels"] for item in kept], batch_first=True, padding_value=IGNORE_INDEX)
        lengths = torch.tensor([len(item["input_ids"]) for item in kept])
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

        for key in CONCATENATED_KEYS:
            tensors = [item[key] for item in kept if key in item]
            if tensors:
                batch[key] = torch.cat(tensors, dim=0)
        if num_skipped:
            batch["num_skipped_samples"] = num_skipped
        sample_ids = [item.get("sample_id") for item in kept]
        if all(sample_id is not None for sample_id in sample_ids):
            batch["sample_ids"] = sample_ids
        return batch
