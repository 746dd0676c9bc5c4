"""What the speed benchmarks run: synthetic batches shaped like the collator's for a model shape, the compression
presets they compare, and what one sample's visual input is (shared by the training, inference, prefill and
decode benchmarks)."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from llava.bench import report
from llava.bench.shapes import ModelShape
from llava.compression.config import CompressionConfig, CompressionConfigError, load_compression
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.model.stages import STAGES

logger = logging.getLogger(__name__)

SYSTEM_PROMPT_TOKENS = 35
"""BOS + Vicuna v1 system prompt + ``USER:`` before the image, in LLaMA tokens (about 35)."""
FIRST_SPECIAL_IDS = 3
"""Random text ids start above pad/BOS/EOS (0, 1, 2 in the benchmark shapes)."""


def _length_jitter(count: int, batch_size: int, generator: torch.Generator) -> list[int]:
    """Per-sample shortening in ``[0, count // 10]``; sample 0 keeps the full length (sets the padded length)."""
    spread = count // 10
    if spread == 0 or batch_size == 1:
        return [0] * batch_size
    jitter = torch.randint(0, spread + 1, (batch_size,), generator=generator).tolist()
    jitter[0] = 0
    return jitter


def _random_ids(count: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(FIRST_SPECIAL_IDS, vocab_size, (count,), generator=generator)


def slot_token_id(shape: ModelShape) -> int:
    """The sentinel of a sample's visual slot: one video (video shapes) or one image."""
    return VIDEO_TOKEN_ID if shape.is_video else IMAGE_TOKEN_ID


def random_pixels(shape: ModelShape, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One image per sample, ``pixel_values`` ``[B, 3, S, S]``; or, for a video shape, one video per sample,
    ``pixel_values_videos`` ``[B, frames, 3, S, S]`` at the video tower's size."""
    size = shape.sample_tower.image_size
    if shape.is_video:
        videos = torch.randn(batch_size, shape.num_frames, 3, size, size, generator=generator)
        return {"pixel_values_videos": videos}
    return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator)}


def anyres_image_token_id(shape: ModelShape) -> int:
    """The image placeholder id of an AnyRes shape's model: the vocabulary's last id (LLaVA-NeXT/OneVision splice
    their image features at real token ids, one per AnyRes token; random text ids avoid it)."""
    return shape.llm.vocab - 1


def expand_anyres_slots(
    batch: dict[str, torch.Tensor],
    shape: ModelShape,
    generator: torch.Generator,
    left_padded: bool = False,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """An AnyRes shape's batch from one with one image slot per row: row ``i`` carries image ``i`` of the shape's
    mix (cycled), its slot expanded to that image's AnyRes token count of :func:`anyres_image_token_id`
    placeholders (labels ignored there), re-padded on the same side; ``pixel_values`` ``[B, max views, 3, S, S]``
    (random, zero past each image's views, as the processor pads them) and ``image_sizes`` ``[B, 2]`` (height,
    width)."""
    token = anyres_image_token_id(shape)
    images = [shape.image_mix[row % len(shape.image_mix)] for row in range(batch["input_ids"].shape[0])]
    counts = [replace(shape, image=image).anyres_counts for image in images]
    rows: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for row, count in enumerate(counts):
        real = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][real]
        ids = torch.where(ids == token, token - 1, ids)
        slot = int((ids == IMAGE_TOKEN_ID).nonzero()[0, 0])
        expanded = torch.cat([ids[:slot], torch.full((count.total,), token), ids[slot + 1 :]])
        labels = None
        if "labels" in batch:
            target = batch["labels"][row][real]
            labels = torch.cat([target[:slot], torch.full((count.total,), IGNORE_INDEX), target[slot + 1 :]])
        rows.append((expanded, labels))
    length = max(len(ids) for ids, _ in rows)
    out = {
        "input_ids": torch.full((len(rows), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
    }
    if "labels" in batch:
        out["labels"] = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels) in enumerate(rows):
        span = slice(length - len(ids), length) if left_padded else slice(0, len(ids))
        out["input_ids"][row, span] = ids
        out["attention_mask"][row, span] = 1
        if labels is not None:
            out["labels"][row, span] = labels
    size = shape.vision.image_size
    pixels = torch.zeros(len(rows), max(count.views for count in counts), 3, size, size)
    for row, count in enumerate(counts):
        pixels[row, : count.views] = torch.randn(count.views, 3, size, size, generator=generator)
    out["pixel_values"] = pixels
    out["image_sizes"] = torch.tensor([[image.height, image.width] for image in images])
    return out


def move_batch(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The batch on ``device``, pixels (images or videos) in the model's ``dtype``."""
    moved = {key: value.to(device) for key, value in batch.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in moved:
            moved[key] = moved[key].to(dtype)
    return moved


def build_training_batch(
    shape: ModelShape, stage: str, batch_size: int, seed: int = 0, pad_token_id: int = 0, bos_token_id: int = 1
) -> dict[str, torch.Tensor]:
    """A right-padded batch shaped like the collator's, with random ids and pixels.

    finetune (``v1``): ``BOS + system prompt``, the image slot, the instruction, then the answer; the last
    ``shape.answer_tokens`` text tokens are supervised (answers are shortened by up to 10% per sample).
    pretrain (``plain``): ``BOS``, the image slot, then ``shape.pretrain_text_tokens - 1`` caption tokens,
    all supervised (captions shortened by up to 10%). One image per sample, ``[B, 3, S, S]`` pixels; for a
    video shape one video slot per sample and ``pixel_values_videos`` ``[B, frames, 3, S, S]`` instead; an AnyRes
    shape the images of its mix, placeholders expanded (:func:`expand_anyres_slots`).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    vocab = shape.llm.vocab
    slot = slot_token_id(shape)
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    if stage == "finetune":
        prompt = shape.text_tokens - shape.answer_tokens
        if prompt < 2 or shape.answer_tokens < 1:
            raise ValueError(f"shape {shape.name}: need >= 2 prompt and >= 1 answer tokens")
        prefix = min(SYSTEM_PROMPT_TOKENS, prompt // 2)
        for cut in _length_jitter(shape.answer_tokens, batch_size, generator):
            answer = max(shape.answer_tokens - cut, 1)
            head = _random_ids(prefix, vocab, generator)
            head[0] = bos_token_id
            instruction = _random_ids(prompt - prefix, vocab, generator)
            answer_ids = _random_ids(answer, vocab, generator)
            ids = torch.cat([head, torch.tensor([slot]), instruction, answer_ids])
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[-answer:] = answer_ids
            rows.append((ids, labels))
    else:
        caption_tokens = shape.pretrain_text_tokens - 1
        if caption_tokens < 1:
            raise ValueError(f"shape {shape.name}: pretrain_text_tokens must be >= 2")
        for cut in _length_jitter(caption_tokens, batch_size, generator):
            caption = _random_ids(max(caption_tokens - cut, 1), vocab, generator)
            ids = torch.cat([torch.tensor([bos_token_id, slot]), caption])
            labels = torch.cat([torch.tensor([IGNORE_INDEX, IGNORE_INDEX]), caption])
            rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for row, (ids, target) in enumerate(rows):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = target
        attention_mask[row, : len(ids)] = 1
    pixels = random_pixels(shape, batch_size, generator)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **pixels}
    if shape.anyres is None:
        return batch
    return expand_anyres_slots(batch, shape, generator, pad_token_id=pad_token_id)


def resolve_presets(specs: Sequence[str], shape: ModelShape) -> list[tuple[str, CompressionConfig]]:
    """``(label, config)`` per ``--presets`` entry, ``none`` first (added when missing: it is the baseline).

    Fails early, naming the preset, when a preset keeps more tokens than the shape's tower has.
    """
    resolved: list[tuple[str, CompressionConfig]] = []
    for spec in specs:
        label = report.preset_label(spec)
        try:
            config = load_compression(spec)
            if config.dymu is None:
                shape.average_visual_tokens(config)
            elif len(config.dymu.thresholds) != shape.sample_tower.layers_run:
                raise ValueError(
                    f"{len(config.dymu.thresholds)} DyMU thresholds for a tower that runs "
                    f"{shape.sample_tower.layers_run} layers"
                )
        except (CompressionConfigError, ValueError) as error:
            raise SystemExit(f"preset {spec!r} does not fit shape {shape.name!r}: {error}") from None
        resolved.append((label, config))
    labels = [label for label, _ in resolved]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"duplicate presets in {labels}")
    baseline = [item for item in resolved if not item[1].enabled]
    if not baseline:
        logger.info("adding the 'none' preset: it is the baseline of every ratio")
        baseline = [("none", CompressionConfig())]
    return baseline[:1] + [item for item in resolved if item[1].enabled]


def measured_initial_tokens(config: CompressionConfig, samples: Sequence[Any]) -> float | None:
    """DyMU: the mean tokens per sample the model reported entering the LLM (its count follows the
    images); ``None`` for every other preset, whose count the accounting knows."""
    if config.dymu is None:
        return None
    return statistics.mean(sample.initial_tokens for sample in samples)


def visual_input_fields(shape: ModelShape, config: CompressionConfig, measured: float | None = None) -> dict[str, Any]:
    """What one sample carries: ``media`` (image/video), ``num_frames`` (0 for an image), ``tokens_per_frame``
    (0 for an image), the uncompressed visual tokens and ``initial_visual_tokens`` (N0, after V2V; DyMU:
    the ``measured`` mean)."""
    return {
        "media": shape.media,
        "num_frames": shape.num_frames,
        "tokens_per_frame": shape.tokens_per_frame,
        "uncompressed_visual_tokens": shape.uncompressed_visual_tokens,
        "initial_visual_tokens": shape.initial_visual_tokens(config, measured),
    }


def video_notes(row: dict[str, Any], training: bool = True) -> list[str]:
    """The report note on how a video row's visual tokens are counted (none for image rows)."""
    if row.get("media") != "video":
        return []
    note = (
        f"each sample is one video of {row['num_frames']} frames x {row['tokens_per_frame']} tokens (video tower, "
        f"CLS kept per frame): visual tok/layer counts one video, {row['uncompressed_visual_tokens']} tokens "
        "uncompressed; V2V merges each frame to its k1 + k2 and T2V keeps floor(ratio x N0) of all frames of the "
        "video jointly."
    )
    if training:
        note += (
            " A video-only training batch also runs the image tower once on a blank image (the idle pass that "
            "keeps distributed ranks in step; the FLOP model counts it)."
        )
    return [note]
