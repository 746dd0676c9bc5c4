"""OpenAI chat-completions requests, read and checked: what a body may hold, where images may come from, the
limits, and the engine job a valid body becomes.

Images arrive as ``image_url`` content parts: ``data:`` URLs (decoded, checked and written to the server's
scratch folder, deleted when the answer ends) or, only when the server names an ``image_folder``, local files
inside it (``file://`` URLs or relative paths; nothing outside the folder, links included). The server never
fetches ``http(s)`` URLs. Text may not hold the model's own ``<image>``/``<video>`` tags: a stranger could
otherwise point a tag at another message's picture. System messages are accepted and ignored: the checkpoint's
conversation template has its own system prompt, the one it was trained with.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from llava.constants import IMAGE_TAG, VISUAL_TAG_PATTERN
from llava.pipeline import Request
from llava.serve.errors import ServeError

KNOWN_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "stop", "seed", "n", "user", "compression", "ignore_eos",
})  # fmt: skip
"""Fields a body may hold; anything else is refused by name (a misspelt option would otherwise be ignored)."""


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; all configurable on the command line."""

    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 40_000_000
    max_images: int = 8
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_messages: int = 64
    max_stop: int = 4


@dataclass
class ParsedRequest:
    """A valid body: the engine request, its sampling options and the scratch files to delete afterwards."""

    request: Request
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    compression: str | None
    model: str | None
    ignore_eos: bool = False
    scratch: list[Path] = field(default_factory=list)

    def remove_scratch(self) -> None:
        """Delete the images this request wrote (its ``data:`` URLs)."""
        for path in self.scratch:
            path.unlink(missing_ok=True)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else int | float)
    if wrong_type or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ServeError(400, f"'{name}' must be {kind} in [{low}, {high}], got {value!r}", param=name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ServeError(400, f"'{name}' must be true or false, got {value!r}", param=name)
    return value


def _stop_strings(value: Any, limit: int) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(text, str) and text for text in stops) or len(stops) > limit:
        raise ServeError(400, f"'stop' must be a non-empty string or a list of at most {limit} of them", param="stop")
    return tuple(stops)


class ImageStore:
    """Where a request's images come from and go: checked ``data:`` URLs written to ``scratch_dir``, and files
    inside ``image_folder`` (``None``: local files refused)."""

    def __init__(self, scratch_dir: Path, image_folder: Path | None, limits: ServeLimits) -> None:
        self.scratch_dir = scratch_dir
        self.image_folder = image_folder.resolve() if image_folder is not None else None
        self.limits = limits

    def resolve(self, url: Any, where: str, scratch: list[Path]) -> str:
        """The local path of the image at ``url`` (written to scratch for a ``data:`` URL)."""
        if not isinstance(url, str) or not url:
            raise ServeError(400, f"{where}: image_url.url must be a non-empty string", param="messages")
        if url.startswith("data:"):
            return self._from_data_url(url, where, scratch)
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https", "ftp"):
            raise ServeError(400, f"{where}: this server does not fetch {scheme} URLs; send the image as a data: URL",
                             param="messages")  # fmt: skip
        return self._from_folder(url, where)

    def _from_data_url(self, url: str, where: str, scratch: list[Path]) -> str:
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise ServeError(400, f"{where}: a data URL must be data:image/<type>;base64,<data>", param="messages")
        if len(payload) * 3 // 4 > self.limits.max_image_bytes:
            raise ServeError(413, f"{where}: the image is larger than {self.limits.max_image_bytes} bytes",
                             param="messages")  # fmt: skip
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ServeError(400, f"{where}: the data URL is not valid base64 ({error})", param="messages") from error
        image = self._decoded(io.BytesIO(data), where)
        path = self.scratch_dir / f"{uuid.uuid4().hex}.png"
        image.save(path)
        scratch.append(path)
        return str(path)

    def _from_folder(self, url: str, where: str) -> str:
        if self.image_folder is None:
            raise ServeError(400, f"{where}: local image files are off (start the server with --image-folder); "
                             "send the image as a data: URL", param="messages")  # fmt: skip
        name = unquote(urlparse(url).path) if url.startswith("file:") else url
        path = (self.image_folder / name).resolve()
        if not path.is_relative_to(self.image_folder):
            raise ServeError(403, f"{where}: {url!r} is outside the server's image folder", param="messages",
                             kind="permission_error")  # fmt: skip
        if not path.is_file():
            raise ServeError(400, f"{where}: no image {url!r} in the server's image folder", param="messages")
        if path.stat().st_size > self.limits.max_image_bytes:
            raise ServeError(413, f"{where}: the image is larger than {self.limits.max_image_bytes} bytes",
                             param="messages")  # fmt: skip
        with open(path, "rb") as handle:
            self._decoded(handle, where)
        return os.fspath(path)

    def _decoded(self, source: Any, where: str) -> Image.Image:
        try:
            with Image.open(source) as image:
                width, height = image.size
                if width * height > self.limits.max_image_pixels:
                    raise ServeError(413, f"{where}: the image has {width}x{height} pixels, more than "
                                     f"{self.limits.max_image_pixels}", param="messages")  # fmt: skip
                return image.convert("RGB")
        except Image.DecompressionBombError as error:  # PIL's own, far larger bound: still too many pixels
            raise ServeError(413, f"{where}: the image has too many pixels ({error})", param="messages") from error
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ServeError(400, f"{where}: the image cannot be decoded ({error})", param="messages") from error


def _content_text(content: Any, role: str, where: str, store: ImageStore, images: list[str],
                  scratch: list[Path]) -> str:  # fmt: skip
    """A message's text with one ``<image>`` tag where each image part is (images appended to ``images``)."""
    if isinstance(content, str):
        parts: list[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise ServeError(400, f"{where}: content must be a string or a non-empty list of parts", param="messages")
    pieces = []
    for index, part in enumerate(parts):
        at = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if VISUAL_TAG_PATTERN.search(part["text"]):
                raise ServeError(400, f"{at}: text may not hold {IMAGE_TAG} or <video> tags; send images as "
                                 "image_url parts", param="messages")  # fmt: skip
            pieces.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict | str):
            if role != "user":
                raise ServeError(400, f"{at}: only user messages may hold images", param="messages")
            if len(images) >= store.limits.max_images:
                raise ServeError(400, f"at most {store.limits.max_images} images per request", param="messages")
            image_url = part["image_url"]
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(store.resolve(url, at, scratch))
            pieces.append(f"{IMAGE_TAG}\n")
        else:
            raise ServeError(400, f"{at}: a part must be {{'type': 'text', 'text': ...}} or "
                             "{'type': 'image_url', 'image_url': {'url': ...}}", param="messages")  # fmt: skip
    return "".join(pieces)


def parse_chat_request(body: Any, store: ImageStore) -> ParsedRequest:
    """Check a ``/v1/chat/completions`` body and turn it into an engine request (images resolved)."""
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise ServeError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; this server takes "
                         f"{', '.join(sorted(KNOWN_FIELDS))}", param=unknown[0])  # fmt: skip
    limits = store.limits
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise ServeError(400, "'n' must be 1", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise ServeError(400, f"at most {limits.max_messages} messages per request", param="messages")
    scratch: list[Path] = []
    try:
        turns: list[tuple[str, str]] = []
        images: list[str] = []
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("system", "user", "assistant"):
                raise ServeError(400, f"{where}: role must be system, user or assistant", param="messages")
            text = _content_text(message.get("content"), role, where, store, images, scratch)
            if role == "system":
                continue
            expected = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
            if role != expected:
                raise ServeError(400, f"{where}: user and assistant messages must alternate, starting with a user "
                                 "message", param="messages")  # fmt: skip
            turns.append((role, text))
        if not turns or turns[-1][0] != "user":
            raise ServeError(400, "the last message must be the user's", param="messages")
        history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
        request: Request = {"prompt": turns[-1][1], "image": images, "history": history}
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise ServeError(400, "'stream_options' must be an object", param="stream_options")
        compression = body.get("compression")
        if compression is not None and not isinstance(compression, str):
            raise ServeError(400, "'compression' must be a preset name", param="compression")
        model = body.get("model")
        return ParsedRequest(
            request=request,
            stream=bool(body.get("stream", False)),
            include_usage=bool(stream_options.get("include_usage", False)),
            max_tokens=_number(
                {"max_tokens": max_tokens}, "max_tokens", limits.default_max_tokens, 1, limits.max_tokens, integer=True
            ),
            temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
            top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
            seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
            stop=_stop_strings(body.get("stop"), limits.max_stop),
            compression=compression,
            model=model if isinstance(model, str) else None,
            ignore_eos=_flag(body, "ignore_eos"),
            scratch=scratch,
        )
    except ServeError:
        for path in scratch:
            path.unlink(missing_ok=True)
        raise
