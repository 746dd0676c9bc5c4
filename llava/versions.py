"""Supported dependency versions and the start-up check against them.

``pyproject.toml`` declares the same ranges (a test keeps the two equal). The check reads installed
versions from package metadata only, so it runs before anything imports transformers and an
unsupported release fails with one line instead of a traceback deep inside transformers.
"""

from __future__ import annotations

import logging
import os
import re
from importlib import metadata

logger = logging.getLogger(__name__)

TRANSFORMERS_MIN = (5, 14)
"""Lowest transformers release the whole suite passed on (5.14.1; see README, "Tested versions")."""
TRANSFORMERS_BELOW = (5, 25)
"""First transformers minor release nobody has tested: excluded."""
ALLOW_UNTESTED_ENV = "DUET_VLM_ALLOW_UNTESTED"
"""Set to 1 to turn the version error into a warning (for trying a new release before bumping)."""


class UnsupportedVersionError(ImportError):
    """An installed dependency is outside the range this project was tested with."""


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise UnsupportedVersionError(f"cannot parse the installed transformers version {version!r}")
    return int(match.group(1)), int(match.group(2))


def supported_transformers_range() -> str:
    """The range as a pip specifier, e.g. ``>=5.5,<5.25``."""
    low, high = TRANSFORMERS_MIN, TRANSFORMERS_BELOW
    return f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"


def check_transformers_version(installed: str | None = None) -> None:
    """Raise :class:`UnsupportedVersionError` (one line) when transformers is missing or out of range.

    With ``DUET_VLM_ALLOW_UNTESTED=1`` an out-of-range version only logs a warning.
    """
    if installed is None:
        try:
            installed = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            raise UnsupportedVersionError(
                f"duet-vlm needs transformers{supported_transformers_range()}, which is not installed"
            ) from None
    if TRANSFORMERS_MIN <= _major_minor(installed) < TRANSFORMERS_BELOW:
        return
    message = (
        f"duet-vlm supports transformers{supported_transformers_range()} but transformers {installed} is installed; "
        f"install the tested set (pip install -c constraints/tested.txt -e .) or set {ALLOW_UNTESTED_ENV}=1 to try it"
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning("%s (continuing: %s=1)", message, ALLOW_UNTESTED_ENV)
        return
    raise UnsupportedVersionError(message)
