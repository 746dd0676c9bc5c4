"""duet-vlm: LLaVA-1.5 training and inference with dual-stage visual token reduction."""

from llava.versions import check_transformers_version

__version__ = "0.1.0"

check_transformers_version()
