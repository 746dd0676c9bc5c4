"""Analytic FLOP model of one LLaVA training step (or one prefill), with and without visual-token compression.

Why: wall-clock savings depend on hardware, kernels and memory traffic; the FLOP ratio ``total(preset) /
total(none)`` is the hardware-free prediction that measured step times (``llava.bench.train_speed``) are
compared against. It is pure arithmetic on a :class:`~llava.bench.shapes.ModelShape`, so it runs in
microseconds for any model size.

Rules (a multiply-add counts as 2 FLOPs; every count is per sample times the batch size; no padding):

1. Sequence: the LLM gets N0 visual tokens per sample (V2V: k1 + k2; otherwise every patch, no CLS, as
   LLaVA's ``patch`` strategy) plus the text (finetune/lora: ``text_tokens``; pretrain:
   ``pretrain_text_tokens``). Layer l sees text + ``visual_tokens_per_layer(...)[l]`` tokens: T2V boundaries
   come from the preset's fractions and the shape's depth, as the model applies them.
   Video shapes: a sample is one video of F frames; N0 = F x (k1 + k2) with V2V (merged per frame), else
   F x (patches + CLS) (Video-LLaVA: 8 x 257 = 2056); T2V keeps ``floor(ratio * N0)`` of all frames jointly.
2. Linear on n tokens: 2 n d_in d_out. Ignored: biases, norms, activations, RoPE, softmax, residuals,
   embedding lookups, token gathers/merges and the loss itself.
3. LLaMA layer: q, o (d x d); k, v (d x kv_heads * head_dim, GQA); gate, up, down. Attention q k^T and
   probs v are 2 n^2 d each for the full square, halved for the causal mask: 2 n^2 d per layer.
4. CLIP tower: patch embedding (linear 3 p^2 -> d on the P patches), then only ``layers_run`` layers (the
   feature layer's index: 23 of 24 for -2), each q, k, v, o + a 2-matrix MLP and full attention over
   T = P + 1 tokens (4 T^2 d). A video runs the video tower once per frame (F times; frames never attend
   to each other in the tower).
5. Projector ``mlp{N}x_gelu`` (or ``linear``): its linears on the N0 tokens (after V2V on k1 + k2 only).
6. DyMU (``--dymu-tokens``, the measured mean per image): the LLM's linears on the merged tokens; with VTU
   attention on every patch position (text + P), without it on the merged tokens; DToMe's A x B key cosines
   in every tower layer run (the batched tower keeps its length, so the tower itself costs as much as
   uncompressed).
   V2V scoring (no grad): k_proj on T rows, q_proj on the CLS row, T scores (2 T d), and the cosine
   similarity of pool members to anchors on head-averaged keys (2 members anchors head_dim); per frame
   for a video (F times).
7. T2V scoring at each boundary the model applies (no grad): q_proj on Q query rows, k_proj on all L rows
   entering the boundary layer, Q x L scores over all heads (2 Q L d). Q = 1 for ``last``; for
   ``instruction``/``salient`` Q = prompt text tokens (text - answer; an upper bound for salient). A
   ``plain`` pretraining sample has no instruction after its image: the model falls back to Q = 1.
8. lm_head only on supervised positions (the loss gathers them first): finetune/lora ``answer_tokens``,
   pretrain the caption (``pretrain_text_tokens - 1``, all but BOS). Prefill: the last token only.
9. Backward: a trained linear costs 2x its forward (input + weight grad), a frozen linear that gradients
   flow through 1x (input grad), attention matmuls 2x. The first trained linear after frozen modules (the
   projector's first) costs 1x: autograd skips the input grad nobody needs. Modules before the first
   trained parameter (tower, V2V) and all no-grad scoring have no backward.
   pretrain: projector trained; LLM and lm_head frozen but back-propagated (1x linears, 2x attention).
   finetune: projector, LLM and lm_head trained. lora: projector trained; LLM frozen (1x) plus rank-r
   adapters on q, k, v, o, gate, up, down (forward 2 n r (d_in + d_out), trained: 2x); lm_head frozen (1x).
10. Gradient checkpointing (the LLaVA recipe's default) runs every decoder layer's forward once more during
    backward: the ``recompute`` component, listed on the backward side.
11. Video shapes in training: a batch without images still runs the image tower once on one blank image
    (and the projector on its tokens, forward and backward) so every rank calls the same modules: the
    ``idle_image`` component, once per step, not per sample (absent for image shapes and in prefill).
12. Not counted: the optimizer step (elementwise, memory-bound), communication, data loading.
13. AnyRes shapes (``llava-next-7b``, ``llava-onevision-7b``, ``small-anyres``; :mod:`llava.bench.anyres`): a
    sample is one image of the shape's image-size mix; every rule above is applied per image (the tower once per
    view, base + tiles, over P (+ CLS) tokens; the projector on every view's full grid before unpadding, or on
    the views' kept tokens with V2V; the LLM on N0 = base + unpadded tiles + newline tokens, V2V keeping a
    fraction of each view and every newline) and the per-image FLOPs are averaged with the mix's weights (a
    padding-free batch of the mix). V2V scoring per view as rule 6 with the budget of a full view.
    LLaVA-OneVision (``llava-onevision-7b``, ``small-anyres-onevision``; the geometry's ``v2v_per_group``): V2V
    selects after packing per view group (the base view; the packed grid, unpadded and downsized past
    ``anyres_max_9``), a fraction of each group's tokens, every newline counted (an upper bound); the projector
    runs on every view's full grid with or without V2V (it projects before packing); scoring has no CLS row: per
    view q_proj and k_proj on the P patches and the P x P logits over all heads (2 P^2 d: the attention each
    patch receives), plus the cosine assignment per group with the group's budget.

CLI: ``python -m llava.bench.flops --shape llava-7b --stage finetune --presets none,duet_192,duet_128,duet_64``
prints total TFLOPs per step, the ratio to ``none`` and the LLM's share for each preset (``--stage prefill``
for inference prefill, ``--breakdown`` for per-component rows); ``--presets`` defaults to the shape's
(video shapes: ``none,duet_video_53,duet_video_93``):
``python -m llava.bench.flops --shape video-llava-7b --stage finetune --presets none,duet_video_53,duet_video_93``.
AnyRes shapes add the prefill ratio and the layer-average fraction of N0 to every row:
``python -m llava.bench.flops --shape llava-next-7b`` (presets default to the ``anyres_*`` ones, on
``llava-onevision-7b`` too).
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from llava.bench.shapes import SHAPES, LLMShape, ModelShape, VisionShape, default_presets, get_shape
from llava.compression.config import CompressionConfig, V2VConfig, load_compression

__all__ = [
    "STAGES",
    "FlopBreakdown",
    "linear_flops",
    "main",
    "predicted_step_ratio",
    "prefill_flops",
    "supervised_tokens",
    "training_step_flops",
]

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune", "lora")
_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")
# Backward multipliers per stage: (LLM linears, attention matmuls, LoRA adapters, lm_head).
_BACKWARD = {"pretrain": (1, 2, 0, 1), "finetune": (2, 2, 0, 2), "lora": (1, 2, 2, 1)}
_LLM_SIDE = ("t2v_scoring", "lm_head", "recompute")


def linear_flops(tokens: float, d_in: int, d_out: int) -> float:
    """FLOPs of a dense layer ``d_in -> d_out`` applied to ``tokens`` rows (2 per multiply-add)."""
    return 2.0 * tokens * d_in * d_out


@dataclass
class FlopBreakdown:
    """FLOPs of one step per component; ``forward`` and ``backward`` share the same keys, in order:
    ``tower``, ``v2v_scoring``, ``projector``, (video shapes in training: ``idle_image``), ``llm_layer_{i}``...,
    ``t2v_scoring``, ``lm_head``, ``recompute``. ``visual_tokens_per_layer`` records the per-sample visual
    counts the LLM saw (per video, all frames, for video shapes)."""

    forward: dict[str, float]
    backward: dict[str, float]
    visual_tokens_per_layer: list[int] = field(default_factory=list)

    @property
    def total_forward(self) -> float:
        """FLOPs of the forward pass (recomputation excluded)."""
        return sum(self.forward.values())

    @property
    def total_backward(self) -> float:
        """FLOPs of the backward pass, gradient-checkpointing recomputation included."""
        return sum(self.backward.values())

    @property
    def total(self) -> float:
        """FLOPs of the whole step (optimizer excluded)."""
        return self.total_forward + self.total_backward

    def component(self, name: str) -> float:
        """Forward + backward FLOPs of one component (0 when absent)."""
        return self.forward.get(name, 0.0) + self.backward.get(name, 0.0)

    @property
    def llm_total(self) -> float:
        """FLOPs spent in the language model: decoder layers, their recomputation, T2V scoring, lm_head."""
        names = [key for key in self.forward if key.startswith("llm_layer_")] + list(_LLM_SIDE)
        return sum(self.component(name) for name in names)

    @property
    def llm_share(self) -> float:
        """Fraction of the step's FLOPs spent in the language model."""
        return self.llm_total / self.total if self.total else 0.0

    def as_rows(self, group_layers: bool = False) -> list[tuple[str, float, float]]:
        """``(component, forward, backward)`` rows in component order; ``group_layers`` sums the decoder
        layers into one ``llm_layers`` row."""
        rows: list[tuple[str, float, float]] = []
        grouped = [0.0, 0.0]
        for name, forward in self.forward.items():
            backward = self.backward.get(name, 0.0)
            if group_layers and name.startswith("llm_layer_"):
                grouped[0] += forward
                grouped[1] += backward
                if name == f"llm_layer_{self._num_layers() - 1}":
                    rows.append(("llm_layers", grouped[0], grouped[1]))
                continue
            rows.append((name, forward, backward))
        return rows

    def _num_layers(self) -> int:
        return sum(1 for key in self.forward if key.startswith("llm_layer_"))


# ----- per-module costs (per sample) -----


def _tower_forward(vision: VisionShape) -> float:
    """Patch embedding plus the encoder layers up to the feature layer, full attention over P + 1 tokens (P
    for a tower without CLS, SigLIP)."""
    d, tokens = vision.hidden, vision.num_patches + int(vision.cls_token)
    patch_embedding = linear_flops(vision.num_patches, 3 * vision.patch_size**2, d)
    layer = 4 * linear_flops(tokens, d, d) + linear_flops(tokens, d, vision.intermediate)
    layer += linear_flops(tokens, vision.intermediate, d) + 2 * (2.0 * tokens * tokens * d)
    return patch_embedding + vision.layers_run * layer


def _v2v_scoring(vision: VisionShape, config: CompressionConfig) -> float:
    """CLS-row attention at the feature layer plus cosine assignment of pool members to anchors; DyMU:
    the A x B key cosines in every layer run (the batched tower keeps its length, so every layer counts T)."""
    if config.dymu is not None:
        tokens = vision.num_patches + 1
        return vision.layers_run * 2.0 * (tokens // 2 + 1) * (tokens // 2) * (vision.hidden // vision.heads)
    v2v = config.v2v
    if v2v is None:
        return 0.0
    d, tokens = vision.hidden, vision.num_patches + 1
    scores = linear_flops(tokens, d, d) + linear_flops(1, d, d) + 2.0 * tokens * d
    # Fraction budgets (AnyRes views): the budget of one full view; no CLS among the kept tokens there.
    dominant, contextual = v2v.budget(vision.num_patches) if v2v.is_fraction else (v2v.dominant - 1, v2v.contextual)
    remaining = vision.num_patches - dominant
    if contextual == 0 or remaining <= 0:
        return scores
    pool = min(v2v.cluster_width * contextual, remaining) if v2v.method == "duet" else remaining
    anchors = min(contextual, pool)
    members = pool - anchors
    return scores + 2.0 * members * anchors * (d // vision.heads)


def _merge_cost(v2v: V2VConfig, tokens: int, head_dim: int) -> float:
    """Cosine assignment of a unit's pool members to its anchors on head-averaged keys, for a fractional
    budget of a unit (view or view group) of ``tokens`` tokens."""
    dominant, contextual = v2v.budget(tokens)
    remaining = tokens - dominant
    if v2v.method == "random" or contextual == 0 or remaining <= 0:
        return 0.0
    pool = min(v2v.cluster_width * contextual, remaining) if v2v.method == "duet" else remaining
    anchors = min(contextual, pool)
    return 2.0 * (pool - anchors) * anchors * head_dim


def _group_v2v_scoring(shape: ModelShape, config: CompressionConfig) -> float:
    """LLaVA-OneVision's V2V (rule 13) for one resolved AnyRes image: per view, the attention its patches receive
    at the feature layer (q_proj and k_proj on its P patches, P x P logits over all heads: 2 P^2 d), then the
    merge per view group (base view, packed grid) with that group's budget."""
    v2v = config.v2v
    if v2v is None:
        return 0.0
    vision, counts = shape.vision, shape.anyres_counts
    d, patches = vision.hidden, vision.num_patches
    per_view = 2 * linear_flops(patches, d, d) + 2.0 * patches * patches * d
    merges = sum(_merge_cost(v2v, tokens, d // vision.heads) for tokens in counts.v2v_groups if tokens > 0)
    return counts.views * per_view + merges


def _projector_linears(shape: ModelShape) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of the projector's linears, in order."""
    d_vision, d_text = shape.vision.hidden, shape.llm.hidden
    if shape.projector == "identity":
        return []
    if shape.projector == "linear":
        return [(d_vision, d_text)]
    match = _MLP_PATTERN.match(shape.projector)
    if match is None:
        raise ValueError(f"unknown projector {shape.projector!r}; expected 'linear', 'identity' or 'mlp<N>x_gelu'")
    return [(d_vision, d_text)] + [(d_text, d_text)] * (int(match.group(1)) - 1)


def _projector_step(shape: ModelShape, tokens: int, training: bool) -> tuple[float, float]:
    """Projector ``(forward, backward)`` on ``tokens`` tokens: it is trained in every stage, and its first
    linear's input grad is skipped (nothing before it is trained)."""
    projector = [linear_flops(tokens, d_in, d_out) for d_in, d_out in _projector_linears(shape)]
    backward = (projector[0] + 2 * sum(projector[1:])) if training and projector else 0.0
    return sum(projector), backward


def _idle_image(shape: ModelShape, config: CompressionConfig) -> tuple[float, float]:
    """``(forward, backward)`` of the idle image pass of a video-only training step: one blank image through
    the image tower (V2V included) and the projector (``patch`` strategy: its patches, or k1 + k2)."""
    vision = shape.vision
    tokens = config.v2v.num_tokens if config.v2v is not None else vision.num_patches
    projector_forward, projector_backward = _projector_step(shape, tokens, training=True)
    return _tower_forward(vision) + _v2v_scoring(vision, config) + projector_forward, projector_backward


def _llm_linears(llm: LLMShape) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of q, k, v, o, gate, up, down."""
    d, kv = llm.hidden, llm.kv_heads * llm.head_dim
    return [(d, d), (d, kv), (d, kv), (d, d), (d, llm.intermediate), (d, llm.intermediate), (llm.intermediate, d)]


def _llm_layer(
    llm: LLMShape, tokens: float, lora_r: int, attention_tokens: float | None = None
) -> tuple[float, float, float]:
    """Forward ``(linears, causal attention, LoRA adapters)`` of one decoder layer on ``tokens`` tokens;
    ``attention_tokens`` (DyMU's VTU: every position) when attention runs on more tokens than the linears."""
    linears = sum(linear_flops(tokens, d_in, d_out) for d_in, d_out in _llm_linears(llm))
    span = tokens if attention_tokens is None else attention_tokens
    attention = 2.0 * span * span * llm.hidden
    lora = sum(2.0 * tokens * lora_r * (d_in + d_out) for d_in, d_out in _llm_linears(llm))
    return linears, attention, lora


def _t2v_scoring(
    llm: LLMShape, config: CompressionConfig, text: int, visual: list[int], queries: int, entering: float
) -> float:
    """Selection cost at every boundary the model applies (boundaries at or past the last layer are skipped):
    the query rows' attention scoring, or CDPruner's DPP (``selector: dpp``: the cosine kernel of the ``n`` visual
    tokens entering, their relevance to the query rows, and the greedy MAP's ``k`` steps over ``n`` items of up to
    ``k`` Cholesky entries). ``entering``: the visual tokens the LLM input holds before any T2V selection."""
    if config.t2v is None:
        return 0.0
    d, kv = llm.hidden, llm.kv_heads * llm.head_dim
    n0 = round(visual[0]) if visual else 0  # DyMU: a measured mean; only the boundary layers are used here
    total = 0.0
    for layer, _ in config.t2v.schedule(llm.num_layers, n0):
        if layer >= llm.num_layers:
            continue
        before = visual[layer - 1] if layer > 0 else entering
        if config.t2v.selector == "dpp":
            kept = visual[layer]
            total += 2.0 * before * before * d + 2.0 * before * min(queries, text) * d + 2.0 * before * kept * kept
            continue
        tokens = text + before
        rows = min(queries, tokens)
        total += linear_flops(rows, d, d) + linear_flops(tokens, d, kv) + 2.0 * rows * tokens * d
    return total


def supervised_tokens(shape: ModelShape, stage: str) -> int:
    """Label positions per sample that reach the lm_head: the answer, or the caption (all but BOS)."""
    _check_stage(stage)
    return shape.pretrain_text_tokens - 1 if stage == "pretrain" else shape.answer_tokens


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {list(STAGES)}")


def _step(
    shape: ModelShape,
    config: CompressionConfig,
    batch_size: int,
    text: int,
    head_tokens: int,
    queries: int,
    stage: str | None,
    gradient_checkpointing: bool,
    lora_r: int,
    dymu_tokens: float | None = None,
) -> FlopBreakdown:
    """Forward (and, for a training ``stage``, backward) FLOPs of a batch; ``stage=None`` is inference."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shape.anyres is not None and shape.image is None:
        steps = [
            (share, _step(image, config, batch_size, text, head_tokens, queries, stage, gradient_checkpointing, lora_r))
            for share, image in shape.mix_images()
        ]
        return _mix_breakdowns(steps)
    llm = shape.llm
    visual = shape.visual_tokens_per_layer(config, measured=dymu_tokens)
    # DyMU's VTU: the linear layers see the merged tokens, attention every position.
    vtu = config.dymu is not None and config.dymu.vtu
    attention_visual = shape.uncompressed_visual_tokens if vtu else None
    rank = lora_r if stage == "lora" else 0
    linear_x, attention_x, lora_x, head_x = _BACKWARD[stage] if stage is not None else (0, 0, 0, 0)

    frames = shape.frames_per_sample
    per_group = shape.anyres is not None and shape.anyres.v2v_per_group and config.dymu is None
    forward: dict[str, float] = {
        "tower": frames * _tower_forward(shape.sample_tower),
        "v2v_scoring": (
            _group_v2v_scoring(shape, config) if per_group else frames * _v2v_scoring(shape.sample_tower, config)
        ),
    }
    backward: dict[str, float] = {"tower": 0.0, "v2v_scoring": 0.0}
    # A selection at the LLM input (CDPruner) runs after the projector: the projector sees every token V2V left.
    entering = shape.visual_tokens_per_layer(replace(config, t2v=None), measured=dymu_tokens)[0]
    projector_tokens = shape.projector_tokens(config) if shape.anyres is not None else entering
    forward["projector"], backward["projector"] = _projector_step(shape, projector_tokens, stage is not None)
    if shape.is_video and stage is not None:  # once per step, not per sample: set after the batch scaling below
        forward["idle_image"] = backward["idle_image"] = 0.0
    layers_forward = 0.0
    for index, count in enumerate(visual):
        span = None if attention_visual is None else text + attention_visual
        linears, attention, lora = _llm_layer(llm, text + count, rank, span)
        forward[f"llm_layer_{index}"] = linears + attention + lora
        backward[f"llm_layer_{index}"] = linear_x * linears + attention_x * attention + lora_x * lora
        layers_forward += linears + attention + lora
    forward["t2v_scoring"] = _t2v_scoring(llm, config, text, visual, queries, entering)
    backward["t2v_scoring"] = 0.0
    forward["lm_head"] = linear_flops(head_tokens, llm.hidden, llm.vocab)
    backward["lm_head"] = head_x * forward["lm_head"]
    forward["recompute"] = 0.0
    backward["recompute"] = layers_forward if stage is not None and gradient_checkpointing else 0.0
    scale = float(batch_size)
    breakdown = FlopBreakdown(
        forward={key: value * scale for key, value in forward.items()},
        backward={key: value * scale for key, value in backward.items()},
        visual_tokens_per_layer=visual,
    )
    if shape.is_video and stage is not None:
        breakdown.forward["idle_image"], breakdown.backward["idle_image"] = _idle_image(shape, config)
    return breakdown


def _mix_breakdowns(steps: list[tuple[float, FlopBreakdown]]) -> FlopBreakdown:
    """The ``share``-weighted mean of per-image breakdowns (same components, same layers)."""
    first = steps[0][1]
    return FlopBreakdown(
        forward={key: sum(share * step.forward[key] for share, step in steps) for key in first.forward},
        backward={key: sum(share * step.backward[key] for share, step in steps) for key in first.backward},
        visual_tokens_per_layer=[
            sum(share * step.visual_tokens_per_layer[layer] for share, step in steps)
            for layer in range(len(first.visual_tokens_per_layer))
        ],
    )


def training_step_flops(
    shape: ModelShape | str,
    compression: CompressionConfig | str | None,
    stage: str,
    batch_size: int,
    gradient_checkpointing: bool = True,
    lora_r: int = 128,
    dymu_tokens: float | None = None,
) -> FlopBreakdown:
    """FLOPs of one training step (forward + backward, optimizer excluded) of ``batch_size`` samples.

    ``stage`` is ``pretrain`` (projector only), ``finetune`` (projector + LLM) or ``lora`` (projector +
    rank-``lora_r`` adapters); ``compression`` is a preset name, YAML path, config or ``None``. A DyMU
    preset needs ``dymu_tokens``, the measured mean tokens per image (``calibrate_dymu --measure``).
    """
    shape = get_shape(shape)
    _check_stage(stage)
    config = load_compression(compression)
    if stage == "pretrain":
        text, queries = shape.pretrain_text_tokens, 1  # plain template: the last prompt token scores
    else:
        text = shape.text_tokens
        queries = 1 if config.t2v is None or config.t2v.query == "last" else max(1, text - shape.answer_tokens)
    head_tokens = supervised_tokens(shape, stage)
    return _step(
        shape, config, batch_size, text, head_tokens, queries, stage, gradient_checkpointing, lora_r, dymu_tokens
    )


class RaggedSample(Protocol):
    """What :func:`ragged_step_flops` reads of a sample (``llava.bench.length_mix.SampleLength``)."""

    text_tokens: int
    answer_tokens: int
    has_visual: bool


def ragged_step_flops(
    shape: ModelShape | str,
    compression: CompressionConfig | str | None,
    samples: Sequence[RaggedSample],
    gradient_checkpointing: bool = True,
    dymu_tokens: float | None = None,
) -> float:
    """FLOPs of one finetuning step over a ragged batch, each sample at its own length: what a padding-free
    (packed) step computes, so a padded step's measured/ideal shows what its padding costs.

    A sample with a visual input costs :func:`training_step_flops` at its text length; a text-only sample
    its decoder layers and lm_head only.
    """
    shape = get_shape(shape)
    config = load_compression(compression)
    linear_x, attention_x, _, head_x = _BACKWARD["finetune"]
    total = 0.0
    for sample in samples:
        sized = replace(shape, text_tokens=sample.text_tokens, answer_tokens=sample.answer_tokens)
        if sample.has_visual:
            total += training_step_flops(sized, config, "finetune", 1, gradient_checkpointing, 0, dymu_tokens).total
            continue
        linears, attention, _ = _llm_layer(shape.llm, sample.text_tokens, 0)
        layers = shape.llm.num_layers * (linears + attention)
        backward = shape.llm.num_layers * (linear_x * linears + attention_x * attention)
        head = linear_flops(sample.answer_tokens, shape.llm.hidden, shape.llm.vocab)
        total += layers + backward + (layers if gradient_checkpointing else 0.0) + head * (1 + head_x)
    return total


def prefill_flops(
    shape: ModelShape | str,
    compression: CompressionConfig | str | None,
    batch_size: int,
    prompt_tokens: int | None = None,
    dymu_tokens: float | None = None,
) -> FlopBreakdown:
    """Forward FLOPs of an inference prefill: image + ``prompt_tokens`` text tokens per sample (default:
    ``text_tokens - answer_tokens``), logits for the last token only. ``backward`` is all zeros.
    ``dymu_tokens``: see :func:`training_step_flops`."""
    shape = get_shape(shape)
    config = load_compression(compression)
    text = shape.text_tokens - shape.answer_tokens if prompt_tokens is None else prompt_tokens
    if text < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {text}")
    queries = 1 if config.t2v is None or config.t2v.query == "last" else text
    return _step(shape, config, batch_size, text, 1, queries, None, False, 0, dymu_tokens)


def predicted_step_ratio(
    shape: ModelShape | str,
    compression: CompressionConfig | str | None,
    stage: str,
    batch_size: int,
    **kwargs: object,
) -> float:
    """``total(compression) / total(none)`` of a training step: the hardware-free prediction of the
    step-time ratio. ``kwargs`` go to :func:`training_step_flops` (``gradient_checkpointing``, ``lora_r``)."""
    compressed = training_step_flops(shape, compression, stage, batch_size, **kwargs)  # type: ignore[arg-type]
    baseline = training_step_flops(shape, None, stage, batch_size, **kwargs)  # type: ignore[arg-type]
    return compressed.total / baseline.total


# ----- CLI -----


def _table(args: argparse.Namespace) -> list[str]:
    shape = get_shape(args.shape)

    def flops_of(preset: str) -> FlopBreakdown:
        if args.stage == "prefill":
            return prefill_flops(shape, preset, args.batch_size, args.prompt_tokens, args.dymu_tokens)
        return training_step_flops(
            shape, preset, args.stage, args.batch_size, not args.no_gradient_checkpointing, args.lora_r,
            args.dymu_tokens,
        )  # fmt: skip

    baseline = flops_of("none")
    what = "prefill" if args.stage == "prefill" else f"{args.stage} step"
    checkpointing = "" if args.stage == "prefill" else f", gradient checkpointing {not args.no_gradient_checkpointing}"
    visual_input = f", {shape.describe_visual_input()} per sample" if shape.is_video else ""
    anyres = shape.anyres is not None
    if anyres:
        visual_input = f", {shape.describe_visual_input()} per sample"
    name_width, n0_width, n0_format = (24, 8, ".1f") if anyres else (16, 6, "g")
    lines = [
        f"{shape.name} {what}, batch {args.batch_size}{checkpointing}{visual_input} (optimizer not counted)",
        f"{'preset':<{name_width}}{'N0':>{n0_width}}{'avg vis':>9}{'TFLOPs':>11}{'vs none':>9}{'saved':>8}"
        f"{'LLM share':>11}" + (f"{'prefill vs none':>17}{'avg/N0':>8}" if anyres else ""),
    ]
    prefill_baseline = prefill_flops(shape, None, args.batch_size, args.prompt_tokens) if anyres else None
    for preset in args.presets:
        flops = flops_of(preset)
        visual = flops.visual_tokens_per_layer
        ratio = flops.total / baseline.total
        extra = ""
        if prefill_baseline is not None:
            prefill = prefill_flops(shape, preset, args.batch_size, args.prompt_tokens).total / prefill_baseline.total
            extra = f"{prefill:>17.3f}{sum(visual) / len(visual) / baseline.visual_tokens_per_layer[0]:>8.3f}"
        lines.append(
            f"{preset:<{name_width}}{visual[0]:>{n0_width}{n0_format}}{sum(visual) / len(visual):>9.2f}"
            f"{flops.total / 1e12:>11.2f}{ratio:>9.3f}{1 - ratio:>8.1%}{flops.llm_share:>11.1%}{extra}"
        )
        if args.breakdown:
            for name, forward, backward in flops.as_rows(group_layers=True):
                lines.append(f"    {name:<14} fwd {forward / 1e12:>10.3f}  bwd {backward / 1e12:>10.3f} TFLOPs")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print predicted FLOPs per step (or prefill) and the ratio to ``none`` for compression presets."""
    parser = argparse.ArgumentParser(prog="python -m llava.bench.flops", description=main.__doc__)
    parser.add_argument("--shape", default="llava-7b", choices=sorted(SHAPES))
    parser.add_argument("--stage", default="finetune", choices=[*STAGES, "prefill"])
    parser.add_argument(
        "--presets",
        default=None,
        help="comma-separated preset names (default: none,duet_192,duet_128,duet_64; video shapes: "
        "none,duet_video_53,duet_video_93)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step (ratios do not depend on it)")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prefill text tokens per sample")
    parser.add_argument("--breakdown", action="store_true", help="per-component rows under each preset")
    parser.add_argument(
        "--dymu-tokens",
        type=float,
        default=None,
        help="DyMU presets: measured mean tokens per image entering the LLM (calibrate_dymu --measure)",
    )
    args = parser.parse_args(argv)
    if args.presets is None:
        args.presets = ",".join(default_presets(args.shape))
    args.presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    if not args.presets:
        parser.error("--presets is empty")
    try:
        lines = _table(args)
    except ValueError as error:  # e.g. an image preset's k1 + k2 exceeds a video tower's 257 tokens
        parser.error(str(error))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
