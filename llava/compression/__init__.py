"""Visual-token compression (DUET-VLM Stage A V2V merging, Stage B T2V dropping): configs and token accounting."""

from llava.compression.accounting import average_visual_tokens, stage_summary, visual_tokens_per_layer
from llava.compression.config import (
    CompressionConfig,
    CompressionConfigError,
    T2VConfig,
    V2VConfig,
    available_presets,
    load_compression,
)

__all__ = [
    "CompressionConfig",
    "CompressionConfigError",
    "T2VConfig",
    "V2VConfig",
    "available_presets",
    "average_visual_tokens",
    "load_compression",
    "stage_summary",
    "visual_tokens_per_layer",
]
