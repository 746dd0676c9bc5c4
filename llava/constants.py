"""Constants shared by the model and the data pipeline."""

import re

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

VISUAL_TAG_PATTERN = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")
"""Matches either placeholder; ``split`` with it keeps the tags, in order."""

VIDEO_PROCESSOR_DIR = "video_processor"
"""Sub-folder of a saved model holding the video tower's image processor (when it has one)."""
