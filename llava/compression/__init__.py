"""Visual-token compression (DUET-VLM Stage A V2V merging, Stage B T2V dropping).

Configs and presets: :mod:`llava.compression.config`; layer-averaged token accounting and budget solvers
(also a CLI): :mod:`llava.compression.accounting`.
"""

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
    "load_compression",
]
