"""Model shapes for benchmarks: the dimensions the FLOP model needs, and random-weight models built from them.

A :class:`ModelShape` names a vision tower (CLIP), a decoder-only LLM (LLaMA/Vicuna) and the text lengths of a
typical training sample, so that the analytic FLOP model (:mod:`llava.bench.flops`) and the measured speed
benchmarks talk about the same model. Shapes:

* ``tiny``: seconds-fast unit-test model (16 patches, 2+2 layers).
* ``small``: CPU benchmark model with LLaVA-1.5's real token geometry (336 px / patch 14 = 576 patches + CLS,
  about 100 text tokens) but reduced width and depth (tower 4 layers of 128, 3 run; LLM 8 layers of 320): about
  0.27 TFLOPs per batch-4 finetune step, a few seconds on a small CPU, and the LLM dominates the cost (about
  97 %), as in the real model. Its narrow width makes attention a larger share of a layer than in Vicuna-7B.
* ``llava-7b`` / ``llava-13b``: CLIP-L/14-336 with Vicuna-7B / Vicuna-13B (LLaVA-1.5).

Video shapes (``num_frames > 0``) add a video tower; every benchmark sample then carries one video instead of
an image: ``num_frames`` frames, each encoded by the video tower into its patches *plus CLS* (Video-LLaVA keeps
CLS per frame: 224 px / patch 14 = 256 patches + 1 = 257 tokens), frame-major in one visual segment. The image
tower is built too (Video-LLaVA has both; a video-only training batch still runs it once on a blank image).

* ``tiny-video``: the ``tiny`` model with a 56 px video tower, 2 frames x 17 tokens = 34 per video.
* ``small-video``: CPU benchmark model with Video-LLaVA's token geometry (8 frames x 257 = 2056 visual tokens,
  about 120 text tokens) and ``small``'s tower (4 layers of 128, 3 run, at 224 px) and 8-layer LLM, narrowed to
  256 wide: about 0.39 TFLOPs per batch-2 finetune step, about 5 s on a quiet 2-core CPU.
* ``video-llava-7b``: Video-LLaVA-7B: CLIP-L/14-224 towers for images and video, Vicuna-7B, 8 frames.

AnyRes shapes (``anyres`` set; :mod:`llava.bench.anyres`) carry one image per sample whose token count follows its
size: a base view plus a grid of tiles, unpadded, one newline token per grid row. The shape's ``image_mix`` is the
typical image-size mix the FLOP model averages over (per image FLOPs, weighted; :meth:`ModelShape.mix_images`):

* ``small-anyres``: CPU benchmark model, LLaVA-NeXT's AnyRes geometry at half scale (168 px views of 12 x 12 =
  144 tokens, the five v1.6 pinpoints halved) on 320x240 and 240x320 images (the mix's 640x480 / 480x640
  halved: the same 2 x 2 tile grids and unpadding, about 600 tokens per image), ``small``'s tower at 168 px and
  an 8-layer LLM of 256; run by the ``llava_next`` family's random model.
* ``small-anyres-onevision``: CPU benchmark model with LLaVA-OneVision's AnyRes rules at about half scale (196 px
  views of 14 x 14 = 196 tokens without CLS, pinpoints 196 x {1..6} by 196 x {1..6}, ``anyres_max_9``) on the
  same 320x240 / 240x320 images (2 x 2 tiles, about 840 tokens), a 4-layer SigLIP-style tower of 128 (no CLS, the
  last layer read) and an 8-layer Qwen2 decoder of 256 with grouped-query attention (4 heads, 2 KV heads); run by
  the ``llava_onevision`` family's random model (V2V per view group after packing, as LLaVA-OneVision's).
* ``llava-next-7b``: LLaVA-NeXT (v1.6) Vicuna-7B, CLIP-L/14-336 AnyRes, on :data:`llava.bench.anyres.IMAGE_MIX`.
* ``llava-onevision-7b``: LLaVA-OneVision Qwen2-7B (28 layers, GQA 28 / 4 heads), SigLIP-so400m/14-384 (26
  layers run, no CLS, 729 tokens per view), ``anyres_max_9``, on the same mix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, PretrainedConfig, Qwen2Config, SiglipVisionConfig

from llava.bench.anyres import (
    IMAGE_MIX,
    NEXT_GEOMETRY,
    ONEVISION_GEOMETRY,
    AnyResCounts,
    AnyResGeometry,
    MixImage,
    anyres_counts,
)
from llava.compression.accounting import (
    anyres_visual_tokens_per_layer,
    average_visual_tokens,
    initial_visual_tokens,
    visual_tokens_per_layer,
)
from llava.compression.config import CompressionConfig
from llava.families.registry import family_named
from llava.hf_adapter import set_attn_implementation
from llava.model.vision_tower import layers_to_run

__all__ = [
    "ANYRES_PRESETS",
    "IMAGE_PRESETS",
    "SHAPES",
    "VIDEO_PRESETS",
    "LLMShape",
    "ModelShape",
    "VisionShape",
    "build_model",
    "default_presets",
    "get_shape",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisionShape:
    """CLIP vision tower dimensions; ``feature_layer`` indexes its hidden states as LLaVA does (-2)."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    image_size: int = 336
    patch_size: int = 14
    feature_layer: int = -2
    cls_token: bool = True  # CLIP carries CLS through its layers; SigLIP has none

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (576 for CLIP-L/14-336); the tower also carries one CLS token."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_run(self) -> int:
        """Encoder layers actually computed to reach the feature layer (24 layers, -2 -> 23)."""
        return layers_to_run(self.num_layers, self.feature_layer)


@dataclass(frozen=True)
class LLMShape:
    """LLaMA decoder dimensions (``kv_heads < heads`` means grouped-query attention)."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads


@dataclass(frozen=True)
class ModelShape:
    """A whole LLaVA (or Video-LLaVA) model plus the text lengths of a typical sample.

    ``text_tokens``: finetune prompt + answer text tokens per sample (system prompt, question, answer);
    ``answer_tokens``: the supervised part of them; ``pretrain_text_tokens``: text tokens of a ``plain``
    pretraining sample (BOS + caption + separator), all supervised but the BOS.

    ``num_frames`` > 0 makes a video shape: each sample carries one video of ``num_frames`` frames through the
    ``video`` tower (which keeps CLS: ``tokens_per_frame`` = patches + 1) instead of one image through
    ``vision`` (patches only). Both towers feed the one projector, so their widths and feature layer match.
    """

    name: str
    vision: VisionShape
    llm: LLMShape
    projector: str = "mlp2x_gelu"
    text_tokens: int = 100
    answer_tokens: int = 30
    pretrain_text_tokens: int = 30
    num_frames: int = 0
    video: VisionShape | None = None
    anyres: AnyResGeometry | None = None
    image_mix: tuple[MixImage, ...] = ()
    image: MixImage | None = None  # an AnyRes shape resolved to one image of its mix (mix_images)
    family: str = "llava"  # the registry family whose random_model builds it

    def __post_init__(self) -> None:
        if self.num_frames < 0:
            raise ValueError(f"shape {self.name}: num_frames must be >= 0, got {self.num_frames}")
        if (self.num_frames > 0) != (self.video is not None):
            raise ValueError(f"shape {self.name}: a video shape needs both num_frames > 0 and a video tower")
        if self.video is not None:
            if self.video.hidden != self.vision.hidden:
                raise ValueError(f"shape {self.name}: the image and video towers share a projector: equal widths")
            if self.video.feature_layer != self.vision.feature_layer:
                raise ValueError(f"shape {self.name}: the image and video towers share one feature layer")
        if self.anyres is not None:
            if self.is_video:
                raise ValueError(f"shape {self.name}: AnyRes shapes carry images, not videos")
            if not self.image_mix:
                raise ValueError(f"shape {self.name}: an AnyRes shape needs an image_mix")
            if self.anyres.view_size != self.vision.image_size or self.anyres.patch_size != self.vision.patch_size:
                raise ValueError(f"shape {self.name}: the AnyRes views must be the tower's image and patch size")

    @property
    def is_anyres(self) -> bool:
        """Whether a sample carries one AnyRes image (base view + tiles; its token count follows its size)."""
        return self.anyres is not None

    def mix_images(self) -> list[tuple[float, ModelShape]]:
        """``(share, shape resolved to that image)`` for each image of an AnyRes shape's mix (shares sum to 1)."""
        if self.anyres is None:
            raise ValueError(f"shape {self.name} is not an AnyRes shape")
        total = sum(image.weight for image in self.image_mix)
        return [(image.weight / total, replace(self, image=image)) for image in self.image_mix]

    @property
    def anyres_counts(self) -> AnyResCounts:
        """AnyRes token counts of the shape's resolved image (:meth:`mix_images`)."""
        if self.anyres is None or self.image is None:
            raise ValueError(f"shape {self.name}: AnyRes counts need a shape resolved to one image (mix_images)")
        return anyres_counts(self.anyres, self.image.height, self.image.width)

    def _mix_mean(self, value: Callable[[ModelShape], float]) -> float:
        return sum(share * value(shape) for share, shape in self.mix_images())

    @property
    def accepts_v2v(self) -> bool:
        """Whether the accounting counts V2V here: a CLS-scored tower (CLIP), or an AnyRes geometry whose V2V
        selects per view group after packing (LLaVA-OneVision's SigLIP: scores are the attention patches
        receive, :mod:`llava.compression.onevision_v2v`)."""
        return self.vision.cls_token or (self.anyres is not None and self.anyres.v2v_per_group)

    def _anyres_per_layer(self, config: CompressionConfig) -> list[float]:
        if config.v2v is not None and not self.accepts_v2v:
            raise ValueError(
                f"shape {self.name}: V2V scores patches by the CLS token's attention and this tower has no CLS "
                f"(compression {config.name!r}); use a T2V-only preset"
            )
        if self.image is not None:
            counts = self.anyres_counts
            per_layer = anyres_visual_tokens_per_layer(
                config, self.llm.num_layers, counts.v2v_groups, counts.newline_tokens
            )
            return [float(count) for count in per_layer]
        mixed = [0.0] * self.llm.num_layers
        for share, shape in self.mix_images():
            for layer, count in enumerate(shape._anyres_per_layer(config)):
                mixed[layer] += share * count
        return mixed

    def projector_tokens(self, config: CompressionConfig) -> float:
        """Tokens the projector runs on per sample: N0, except for an AnyRes image, where it runs on every view's
        full grid before unpadding (``views x view tokens``) or, with LLaVA-NeXT's V2V (per view, before the
        projector), on the views' kept tokens; LLaVA-OneVision's V2V selects after packing, so its projector still
        runs on every view's full grid."""
        if self.anyres is None:
            return self.initial_visual_tokens(config)
        if self.image is None:
            return self._mix_mean(lambda shape: shape.projector_tokens(config))
        counts = self.anyres_counts
        if config.v2v is not None and not self.anyres.v2v_per_group:
            return self.initial_visual_tokens(config) - counts.newline_tokens
        return float(counts.views * self.anyres.view_tokens)

    @property
    def is_video(self) -> bool:
        """Whether a sample carries one video (``num_frames`` frames) rather than one image."""
        return self.num_frames > 0

    @property
    def media(self) -> str:
        """``video`` or ``image``: what one benchmark sample carries."""
        return "video" if self.is_video else "image"

    @property
    def sample_tower(self) -> VisionShape:
        """The tower a sample's pixels go through: the video tower (per frame) or the image tower."""
        return self.video if self.video is not None else self.vision

    @property
    def frames_per_sample(self) -> int:
        """Tower passes per sample: ``num_frames`` for a video, the views of an AnyRes image (base + tiles; an
        unresolved AnyRes shape: the mix's mean, rounded), 1 for an image."""
        if self.anyres is not None:
            if self.image is None:
                return round(self._mix_mean(lambda shape: shape.frames_per_sample))
            return self.anyres_counts.views
        return max(self.num_frames, 1)

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame before compression: patches + CLS (257 for Video-LLaVA); 0 for images."""
        return self.video.num_patches + 1 if self.video is not None else 0

    @property
    def uncompressed_visual_tokens(self) -> int:
        """Visual tokens per sample without compression: frames x tokens per frame, or the image's patches, or an
        AnyRes image's tokens (an unresolved AnyRes shape: the mix's mean, rounded)."""
        if self.anyres is not None:
            if self.image is None:
                return round(self._mix_mean(lambda shape: shape.uncompressed_visual_tokens))
            return self.anyres_counts.total
        return self.num_frames * self.tokens_per_frame if self.is_video else self.vision.num_patches

    def _accounting(self) -> dict[str, int | bool]:
        return {
            "num_patches": self.sample_tower.num_patches,
            "num_frames": self.frames_per_sample,
            "cls_token": self.is_video,
        }

    def initial_visual_tokens(self, config: CompressionConfig, measured: float | None = None) -> float:
        """``N0`` per sample: V2V's ``k1 + k2`` (per frame, times the frames) or every token of the sample;
        DyMU: the ``measured`` mean; AnyRes: per view (the mix's weighted mean when unresolved)."""
        if self.anyres is not None:
            return self._anyres_per_layer(config)[0]
        return initial_visual_tokens(config, **self._accounting(), measured=measured)

    def visual_tokens_per_layer(self, config: CompressionConfig, measured: float | None = None) -> list[float]:
        """Visual tokens per sample (one image or one video, all frames) seen by each LLM layer (AnyRes
        shapes: the mix's weighted mean per layer when unresolved)."""
        if self.anyres is not None:
            return self._anyres_per_layer(config)
        return visual_tokens_per_layer(config, self.llm.num_layers, **self._accounting(), measured=measured)

    def average_visual_tokens(self, config: CompressionConfig, measured: float | None = None) -> float:
        """Visual tokens per sample averaged over the LLM layers (the papers' token count)."""
        if self.anyres is not None:
            per_layer = self._anyres_per_layer(config)
            return sum(per_layer) / len(per_layer)
        return average_visual_tokens(config, self.llm.num_layers, **self._accounting(), measured=measured)

    def describe_visual_input(self) -> str:
        """``one video of 8 frames x 257 tokens`` or ``one image of 576 tokens``: what a sample carries."""
        if self.is_video:
            return f"one video of {self.num_frames} frames x {self.tokens_per_frame} tokens"
        if self.anyres is not None:
            if self.image is not None:
                return f"one {self.image.label} AnyRes image of {self.uncompressed_visual_tokens} tokens"
            mix = ", ".join(f"{image.label} x{image.weight:g}" for image in self.image_mix)
            return f"one AnyRes image of the mix {mix} (mean {self.uncompressed_visual_tokens} tokens)"
        return f"one image of {self.vision.num_patches} tokens"


_CLIP_L_336 = VisionShape(num_layers=24, hidden=1024, intermediate=4096, heads=16)
_CLIP_L_224 = VisionShape(num_layers=24, hidden=1024, intermediate=4096, heads=16, image_size=224)
_TINY_VISION = VisionShape(num_layers=2, hidden=32, intermediate=64, heads=4, image_size=56, patch_size=14)
_TINY_LLM = LLMShape(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128)
_SMALL_224 = VisionShape(num_layers=4, hidden=128, intermediate=512, heads=4, image_size=224)
_VICUNA_7B = LLMShape(num_layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
# A Video-LLaVA instruction sample (Video-ChatGPT style): system prompt + question (about 60 tokens) and a
# one-paragraph answer (about 60 tokens); video captions for pretraining are short, like image captions.
_VIDEO_TEXT = {"text_tokens": 120, "answer_tokens": 60, "pretrain_text_tokens": 30}
# SigLIP-so400m/14-384 as LLaVA-OneVision ships it (26 layers, the last one read, no CLS: 729 tokens per view).
_SIGLIP_384 = VisionShape(
    num_layers=26, hidden=1152, intermediate=4304, heads=16, image_size=384, feature_layer=-1, cls_token=False
)
_QWEN2_7B = LLMShape(num_layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152128)
# LLaVA-NeXT's AnyRes geometry at half scale for CPU runs: 168 px views of 12 x 12 tokens, the pinpoints halved.
SMALL_ANYRES_GEOMETRY = AnyResGeometry(
    name="llava-next-half",
    view_size=168,
    patch_size=14,
    grid_pinpoints=tuple((height // 2, width // 2) for height, width in NEXT_GEOMETRY.grid_pinpoints),
)
# LLaVA-OneVision's AnyRes rules at about half scale: 196 px views (14 x 14 tokens), 6 x 6 pinpoints, anyres_max_9.
SMALL_ONEVISION_GEOMETRY = AnyResGeometry(
    name="llava-onevision-half",
    view_size=196,
    patch_size=14,
    grid_pinpoints=tuple((196 * rows, 196 * cols) for rows in range(1, 7) for cols in range(1, 7)),
    max_views=9,
    v2v_per_group=True,
)

SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(
        name="tiny",
        vision=_TINY_VISION,
        llm=_TINY_LLM,
        text_tokens=16,
        answer_tokens=6,
        pretrain_text_tokens=8,
    ),
    "small": ModelShape(
        name="small",
        vision=VisionShape(num_layers=4, hidden=128, intermediate=512, heads=4),
        # 8 layers keep the presets' boundaries (0.5, 0.75) on whole layers (4, 6) as on the 32-layer Vicuna.
        llm=LLMShape(num_layers=8, hidden=320, intermediate=864, heads=5, kv_heads=5, vocab=32000),
    ),
    "llava-7b": ModelShape(name="llava-7b", vision=_CLIP_L_336, llm=_VICUNA_7B),
    "llava-13b": ModelShape(
        name="llava-13b",
        vision=_CLIP_L_336,
        llm=LLMShape(num_layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40, vocab=32000),
    ),
    "tiny-video": ModelShape(
        name="tiny-video",
        vision=_TINY_VISION,
        video=_TINY_VISION,
        num_frames=2,
        llm=_TINY_LLM,
        text_tokens=16,
        answer_tokens=6,
        pretrain_text_tokens=8,
    ),
    "small-video": ModelShape(
        name="small-video",
        vision=_SMALL_224,
        video=_SMALL_224,
        num_frames=8,
        llm=LLMShape(num_layers=8, hidden=256, intermediate=688, heads=4, kv_heads=4, vocab=32000),
        **_VIDEO_TEXT,
    ),
    "video-llava-7b": ModelShape(
        name="video-llava-7b", vision=_CLIP_L_224, video=_CLIP_L_224, num_frames=8, llm=_VICUNA_7B, **_VIDEO_TEXT
    ),
    "small-anyres": ModelShape(
        name="small-anyres",
        vision=VisionShape(num_layers=4, hidden=128, intermediate=512, heads=4, image_size=168),
        llm=LLMShape(num_layers=8, hidden=256, intermediate=688, heads=4, kv_heads=4, vocab=32000),
        anyres=SMALL_ANYRES_GEOMETRY,
        image_mix=(MixImage(320, 240, 0.5), MixImage(240, 320, 0.5)),
        family="llava_next",
    ),
    "small-anyres-onevision": ModelShape(
        name="small-anyres-onevision",
        vision=VisionShape(
            num_layers=4, hidden=128, intermediate=512, heads=4, image_size=196, feature_layer=-1, cls_token=False
        ),
        llm=LLMShape(num_layers=8, hidden=256, intermediate=688, heads=4, kv_heads=2, vocab=32000),
        anyres=SMALL_ONEVISION_GEOMETRY,
        image_mix=(MixImage(320, 240, 0.5), MixImage(240, 320, 0.5)),
        family="llava_onevision",
    ),
    "llava-next-7b": ModelShape(
        name="llava-next-7b",
        vision=_CLIP_L_336,
        llm=_VICUNA_7B,
        anyres=NEXT_GEOMETRY,
        image_mix=IMAGE_MIX,
        family="llava_next",
    ),
    "llava-onevision-7b": ModelShape(
        name="llava-onevision-7b",
        vision=_SIGLIP_384,
        llm=_QWEN2_7B,
        anyres=ONEVISION_GEOMETRY,
        image_mix=IMAGE_MIX,
        family="llava_onevision",
    ),
}

IMAGE_PRESETS = ("none", "duet_192", "duet_128", "duet_64")
"""Default benchmark presets of image shapes (LLaVA-1.5 budgets: 192 / 128 / 64 tokens per layer)."""
VIDEO_PRESETS = ("none", "duet_video_53", "duet_video_93")
"""Default benchmark presets of video shapes (per-frame V2V to 192 / 27 tokens, then joint T2V)."""
ANYRES_PRESETS = (
    "none",
    "anyres_duet_third",
    "anyres_duet_ninth",
    "anyres_visionzip_third",
    "anyres_pdrop_third",
    "anyres_pdrop_ninth",
)
"""Default benchmark presets of AnyRes shapes (fractions of each image's tokens: layer averages 1/3 and 1/9)."""
ANYRES_T2V_PRESETS = ("none", "anyres_pdrop_third", "anyres_pdrop_ninth")
"""Default presets of AnyRes shapes whose V2V the accounting refuses (a tower without CLS whose V2V does not select
per view group after packing; LLaVA-OneVision's shapes do, and take :data:`ANYRES_PRESETS`)."""


def default_presets(shape: ModelShape | str) -> list[str]:
    """The presets benchmarks and the FLOP table compare by default for ``shape`` (video, AnyRes or image)."""
    shape = get_shape(shape)
    if shape.anyres is not None:
        return list(ANYRES_PRESETS if shape.accepts_v2v else ANYRES_T2V_PRESETS)
    return list(VIDEO_PRESETS if shape.is_video else IMAGE_PRESETS)


def get_shape(name: str | ModelShape) -> ModelShape:
    """The shape called ``name`` (a :class:`ModelShape` is returned as is)."""
    if isinstance(name, ModelShape):
        return name
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; available: {sorted(SHAPES)}") from None


def vision_config(
    shape: ModelShape, attn_implementation: str = "sdpa", tower: VisionShape | None = None
) -> CLIPVisionConfig:
    """HF ``CLIPVisionConfig`` for the shape's image tower (or ``tower``, e.g. its video tower)."""
    vision = tower if tower is not None else shape.vision
    config = CLIPVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=vision.intermediate,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
    )
    set_attn_implementation(config, attn_implementation)
    return config


def text_config(shape: ModelShape, attn_implementation: str = "sdpa") -> LlamaConfig:
    """HF ``LlamaConfig`` for the shape's LLM (Vicuna token ids: pad 0, BOS 1, EOS 2)."""
    llm = shape.llm
    config = LlamaConfig(
        hidden_size=llm.hidden,
        intermediate_size=llm.intermediate,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.heads,
        num_key_value_heads=llm.kv_heads,
        vocab_size=llm.vocab,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    set_attn_implementation(config, attn_implementation)
    return config


def build_model(
    shape: ModelShape | str,
    compression: CompressionConfig | str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
) -> nn.Module:
    """A LLaVA model (the registry's ``llava`` family) with random weights and the shape's dimensions.

    The parameters are created directly in ``dtype`` (and on ``device`` when given), so a 7B model never
    exists in fp32 on the host. Benchmarks need speed, not quality: nothing is loaded from disk.
    """
    shape = get_shape(shape)
    if shape.anyres is not None:
        return _build_anyres_model(shape, compression, dtype, attn_implementation, device)
    video: dict[str, object] = {}
    if shape.video is not None:
        video = {
            "video_config": vision_config(shape, attn_implementation, shape.video),
            "video_feature_select_strategy": "cls_patch",
            "num_frames": shape.num_frames,
        }
    config_fields = {
        "vision_config": vision_config(shape, attn_implementation),
        "text_config": text_config(shape, attn_implementation),
        "projector_type": shape.projector,
        "vision_feature_layer": shape.vision.feature_layer,
        "compression": compression,
        **video,
    }
    model = family_named("llava").random_model(config_fields, dtype, device, attn_implementation)
    config = model.config
    logger.info(
        "built %s%s (compression %s): %.1fM parameters, %s",
        shape.name,
        f" with a video tower ({shape.num_frames} frames)" if shape.is_video else "",
        config.compression["name"] if config.compression else "none",
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
    )
    return model


def anyres_config_fields(shape: ModelShape, attn_implementation: str = "sdpa") -> dict[str, Any]:
    """A LLaVA-NeXT config (CLIP towers) or a LLaVA-OneVision one (towers without CLS: SigLIP, Qwen2 decoder)
    fields of an AnyRes shape: its pinpoints, the vocabulary's last id as the image placeholder, the ``default``
    select strategy for CLIP (CLS dropped) or ``full`` for SigLIP, and ``anyres_max_N`` when capped."""
    anyres = shape.anyres
    if anyres is None:
        raise ValueError(f"shape {shape.name} is not an AnyRes shape")
    vision = shape.vision
    if vision.cls_token:
        vision_fields: PretrainedConfig = vision_config(shape, attn_implementation)
        text_fields: PretrainedConfig = text_config(shape, attn_implementation)
    else:
        vision_fields = SiglipVisionConfig(
            hidden_size=vision.hidden,
            intermediate_size=vision.intermediate,
            num_hidden_layers=vision.num_layers,
            num_attention_heads=vision.heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
        )
        llm = shape.llm
        text_fields = Qwen2Config(
            hidden_size=llm.hidden,
            intermediate_size=llm.intermediate,
            num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.heads,
            num_key_value_heads=llm.kv_heads,
            vocab_size=llm.vocab,
            max_position_embeddings=32768,
        )
        for part in (vision_fields, text_fields):
            set_attn_implementation(part, attn_implementation)
    fields: dict[str, Any] = {
        "vision_config": vision_fields.to_dict(),
        "text_config": text_fields.to_dict(),
        "image_grid_pinpoints": [list(pinpoint) for pinpoint in anyres.grid_pinpoints],
        "image_token_id": shape.llm.vocab - 1,
        "vision_feature_layer": vision.feature_layer,
        "vision_feature_select_strategy": "default" if vision.cls_token else "full",
    }
    if anyres.max_views is not None:
        fields["vision_aspect_ratio"] = f"anyres_max_{anyres.max_views}"
    return fields


def _build_anyres_model(
    shape: ModelShape,
    compression: CompressionConfig | str | None,
    dtype: torch.dtype,
    attn_implementation: str,
    device: str | torch.device | None,
) -> nn.Module:
    """An AnyRes shape's model with random weights: the registry family ``shape.family``'s ``random_model``."""
    fields = anyres_config_fields(shape, attn_implementation)
    model = family_named(shape.family).random_model(fields, dtype, device, attn_implementation)
    model.set_compression(compression)
    logger.info(
        "built %s (%s family, compression %s): %.1fM parameters, %s",
        shape.name,
        shape.family,
        compression if isinstance(compression, str) or compression is None else compression.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
    )
    return model
