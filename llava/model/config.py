"""Configuration of the composite LLaVA model (vision tower + projector + decoder-only LM)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, PreTrainedConfig

from llava.constants import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.hf_adapter import attn_implementation_of, set_attn_implementation

FEATURE_STRATEGIES = ("patch", "cls_patch")


def _as_config(value: Any, default_type: str, optional: bool = False) -> PreTrainedConfig | None:
    """Turn a dict (as read from config.json) or ``None`` into a config object of its ``model_type``.

    ``None`` gives the default config, or stays ``None`` when the sub-model is ``optional``."""
    if value is None and optional:
        return None
    if value is None:
        return CLIPVisionConfig() if default_type == "clip_vision_model" else LlamaConfig()
    if isinstance(value, PreTrainedConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"expected a config or dict, got {type(value).__name__}")
    fields = dict(value)
    model_type = fields.pop("model_type", default_type)
    return AutoConfig.for_model(model_type, **fields)


def _normalise_compression(spec: Any) -> dict | None:
    """Store compression as a self-contained dict (no preset files needed to reload the model)."""
    if spec is None or spec == "none":
        return None
    from llava.compression.config import load_compression

    compression = load_compression(spec)
    return compression.to_dict() if compression.enabled else None


class DuetLlavaConfig(PreTrainedConfig):
    """Config of :class:`~llava.model.modeling.DuetLlavaForCausalLM`.

    Args:
        vision_config: config of the CLIP vision tower (``CLIPVisionConfig`` or dict).
        text_config: config of the decoder-only language model (LLaMA/Vicuna, or any
            ``AutoModelForCausalLM`` with the same decoder-layer interface).
        projector_type: ``linear``, ``mlp{N}x_gelu`` or ``identity``.
        vision_feature_layer: index into the tower's hidden states (LLaVA-1.5: -2).
        vision_feature_select_strategy: ``patch`` (drop CLS: 576 tokens for CLIP-L/14-336)
            or ``cls_patch`` (keep CLS: 577).
        image_token_id: sentinel id that marks one image slot in ``input_ids``.
        image_aspect_ratio: ``pad`` or ``square``, used by the data pipeline and inference.
        template: conversation template the model was trained with (``plain``, ``v1``).
        compression: name of a compression preset or a dict (recorded for reproducibility).
        video_config: config of the video tower (Video-LLaVA: a second CLIP, 224 px); ``None`` for an
            image-only model.
        video_feature_select_strategy: tokens kept per frame (Video-LLaVA keeps CLS: 257 per frame).
        num_frames: frames sampled per video.
        video_token_id: sentinel id that marks one video slot in ``input_ids``.
    """

    model_type = "duet_llava"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig, "video_config": AutoConfig}

    def __init__(
        self,
        vision_config: Any = None,
        text_config: Any = None,
        projector_type: str = "mlp2x_gelu",
        vision_feature_layer: int = -2,
        vision_feature_select_strategy: str = "patch",
        image_token_id: int = IMAGE_TOKEN_ID,
        image_aspect_ratio: str = "pad",
        template: str = "v1",
        compression: Any = None,
        video_config: Any = None,
        video_feature_select_strategy: str = "cls_patch",
        num_frames: int = 8,
        video_token_id: int = VIDEO_TOKEN_ID,
        **kwargs: Any,
    ) -> None:
        for name, strategy in (
            ("vision_feature_select_strategy", vision_feature_select_strategy),
            ("video_feature_select_strategy", video_feature_select_strategy),
        ):
            if strategy not in FEATURE_STRATEGIES:
                raise ValueError(f"{name} must be one of {FEATURE_STRATEGIES}, got {strategy!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if video_token_id == image_token_id:
            raise ValueError(f"video_token_id and image_token_id must differ, both are {image_token_id}")
        self.vision_config = _as_config(vision_config, "clip_vision_model")
        self.text_config = _as_config(text_config, "llama")
        self.projector_type = projector_type
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token_id = image_token_id
        self.image_aspect_ratio = image_aspect_ratio
        self.template = template
        self.compression = _normalise_compression(compression)
        self.video_config = _as_config(video_config, "clip_vision_model", optional=True)
        self.video_feature_select_strategy = video_feature_select_strategy
        self.num_frames = num_frames
        self.video_token_id = video_token_id
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        sub_attn = {
            key: attn_implementation_of(getattr(self, key))
            for key in ("vision_config", "text_config", "video_config")
            if getattr(self, key) is not None
        }
        super().__init__(**kwargs)
        if attn_implementation_of(self) is None:
            # The base class pushes the composite's (unset) choice down to the sub-configs; keep theirs.
            for key, value in sub_attn.items():
                set_attn_implementation(getattr(self, key), value)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image produced by the tower (576 for CLIP-L/14-336)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    def compression_config(self):
        """The parsed :class:`~llava.compression.config.CompressionConfig` (``none`` when unset)."""
        from llava.compression.config import load_compression

        return load_compression(self.compression)

    @property
    def llm_tokens_per_image(self) -> int:
        """Visual tokens per image entering the LLM: after V2V merging when it is configured."""
        v2v = self.compression_config().v2v
        return v2v.num_tokens if v2v is not None else self.tokens_per_image

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens per image entering the projector, before any compression."""
        return self.num_patches + (1 if self.vision_feature_select_strategy == "cls_patch" else 0)

    @property
    def has_video_tower(self) -> bool:
        """Whether the model reads videos (a ``video_config`` is set)."""
        return self.video_config is not None

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per video frame entering the projector, before compression (257 for Video-LLaVA)."""
        if self.video_config is None:
            raise ValueError("this model has no video tower (video_config is None)")
        patches = (self.video_config.image_size // self.video_config.patch_size) ** 2
        return patches + (1 if self.video_feature_select_strategy == "cls_patch" else 0)

    @property
    def llm_tokens_per_video(self) -> int:
        """Visual tokens per video entering the LLM: frames x (V2V tokens per frame, or all of them)."""
        v2v = self.compression_config().v2v
        per_frame = v2v.num_tokens if v2v is not None else self.tokens_per_frame
        return self.num_frames * per_frame
