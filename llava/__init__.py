"""duet-vlm: LLaVA-1.5 training and inference with dual-stage visual token reduction."""

__version__ = "0.1.0"
