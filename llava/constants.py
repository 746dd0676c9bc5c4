"""Constants shared by the model and the data pipeline."""

IGNORE_INDEX = -100
"""Label value that the loss ignores (PyTorch's cross-entropy default)."""

IMAGE_TOKEN_ID = -200
"""Sentinel id that marks one image slot in ``input_ids``.

It is negative so it can never collide with a vocabulary entry; the model replaces every
sentinel with that image's visual tokens (however many the tower and compressor produce).
"""

IMAGE_TAG = "<image>"
"""Placeholder for an image in LLaVA JSON conversations."""

VIDEO_TOKEN_ID = -201
"""Sentinel id that marks one video slot in ``input_ids``: replaced by all frames' visual tokens."""

VIDEO_TAG = "<video>"
"""Placeholder for a video in Video-LLaVA JSON conversations."""
