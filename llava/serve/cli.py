"""Chat with a trained model in the terminal: ``python -m llava.serve.cli --model DIR [--image IMG]``.

Each answer streams token by token through a :class:`~llava.serve.engine.BatchingEngine` (one job at a time).
The conversation is multi-turn: every request carries the earlier turns and all images so far. Commands:
``/image PATH`` (the image joins the next message), ``/reset`` (forget turns and images), ``/compression NAME``
(switch the visual-token compression preset), ``/help``, ``/quit`` or ``/exit``.

Ctrl-C while an answer streams stops that answer (``[stopped]``; the partial answer stays in the conversation)
and returns to the prompt. Ctrl-C at the prompt ends the program with exit code 130 (the shell's code for
SIGINT); Ctrl-D (end of input), ``/quit`` and ``/exit`` end it with code 0. A request that fails prints
``error: ...`` on stderr and the conversation goes on without that turn.
"""

from __future__ import annotations

import argparse
import queue
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from llava.constants import IMAGE_TAG
from llava.data.images import ImageError, load_image
from llava.inference import load_pipeline
from llava.pipeline import Request, build_prompt_text
from llava.serve.engine import BatchingEngine, Delta, Event, Failed, Finished, GenerationJob
from llava.serve.errors import ServeError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C at the prompt (128 + SIGINT, as shells report it)."""

POLL_S = 0.1
"""How long the main thread waits for the next event at a time: short, so Ctrl-C is noticed at once."""

HELP = """commands:
  /image PATH         add an image; it joins your next message
  /reset              forget the conversation and its images
  /compression NAME   switch the compression preset ({presets})
  /help               this text
  /quit, /exit        leave (Ctrl-D too)
Ctrl-C stops an answer; at the prompt it leaves."""


def check_image(path: str) -> str | None:
    """Why ``path`` cannot be a chat image (missing, not a file, does not decode), or ``None`` when it can."""
    if not path:
        return "give a path: /image PATH"
    if not Path(path).is_file():
        return f"image file not found: {path}"
    try:
        load_image(path)
    except (ImageError, OSError, ValueError) as error:
        return f"cannot read {path} as an image: {error}"
    return None


@dataclass
class ChatSession:
    """One terminal conversation over ``engine``: turns as ``(user text with its image tags, answer)`` pairs and
    the conversation's images in tag order. Kept apart from the terminal so tests can drive it."""

    engine: BatchingEngine
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    compression: str | None = None
    ignore_eos: bool = False
    turns: list[tuple[str, str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    pending_images: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    """Every request submitted, in order (what tests check)."""

    # ----- the loop -----
    def run(self, read_line: Callable[[str], str] = input) -> int:
        """Read lines with ``read_line`` (``input``-like: raises ``EOFError`` at the end) until the user leaves;
        returns the exit code (0, or :data:`EXIT_INTERRUPTED` after Ctrl-C at the prompt)."""
        while True:
            try:
                line = read_line("USER: ")
            except EOFError:
                self._print()
                return 0
            except KeyboardInterrupt:
                self._print()
                return EXIT_INTERRUPTED
            if not self.handle(line):
                return 0

    def handle(self, line: str) -> bool:
        """One line of input: a command or a message to answer. Returns ``False`` when the user leaves."""
        text = line.strip()
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            return self.command(command.lower(), argument.strip())
        if text:
            self.ask(text)
        return True

    def command(self, name: str, argument: str) -> bool:
        """Run a ``/command`` (an unknown one prints an error); returns ``False`` for ``/quit`` and ``/exit``."""
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self._print(HELP.format(presets=", ".join(self.engine.presets)))
        elif name == "/reset":
            self.reset()
            self._print("(conversation and images forgotten)")
        elif name == "/image":
            self.add_image(argument)
        elif name == "/compression":
            self.set_compression(argument)
        else:
            self._error(f"unknown command {name}; /help lists them")
        return True

    def reset(self) -> None:
        """Forget the turns and every image (the pending ones too)."""
        self.turns.clear()
        self.images.clear()
        self.pending_images.clear()

    def add_image(self, path: str) -> bool:
        """Add an image for the next message when it exists and decodes; else print why and add nothing."""
        problem = check_image(path)
        if problem is not None:
            self._error(problem)
            return False
        self.pending_images.append(path)
        self._print(f"(image {path} joins your next message)")
        return True

    def set_compression(self, name: str) -> bool:
        """Switch the compression preset of the next answers, if the engine runs it."""
        if name not in self.engine.presets:
            self._error(f"unknown compression preset {name!r}; this model runs {', '.join(self.engine.presets)}")
            return False
        self.compression = name
        self._print(f"(compression: {name})")
        return True

    # ----- answering -----
    def request_for(self, text: str) -> tuple[Request, str]:
        """The request answering ``text`` (all images so far, the turns as history) and the user text the
        history keeps for this turn: ``text`` with one ``<image>`` tag per image it introduces. Raises
        ``ValueError`` when ``text`` holds tags that do not match its new images."""
        stored = build_prompt_text(text, len(self.pending_images))
        request: Request = {"prompt": text, "image": [*self.images, *self.pending_images] or None}
        if self.turns:
            request["history"] = list(self.turns)
        return request, stored

    def ask(self, text: str) -> str | None:
        """Answer ``text``, streaming it to ``out``; returns the answer kept in the conversation (partial after
        Ctrl-C), or ``None`` when the request failed (the turn is then not kept)."""
        try:
            request, stored = self.request_for(text)
        except ValueError as error:
            self._error(f"{error} (images join a message with /image; {IMAGE_TAG} tags are optional)")
            return None
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        job = GenerationJob(request, events.put, max_tokens=self.max_tokens, temperature=self.temperature,
                            top_p=self.top_p, seed=self.seed, compression=self.compression,
                            ignore_eos=self.ignore_eos)  # fmt: skip
        try:
            self.engine.submit(job)
        except ServeError as error:
            self._error(error.message)
            return None
        self.requests.append(request)
        shown: list[str] = []
        end, stopped = self._stream(job, events, shown)
        self._print()
        if isinstance(end, Failed):
            self._error(end.error.message)
            return None
        answer = "".join(shown) if stopped or end is None else end.text
        self.turns.append((stored, answer))
        self.images.extend(self.pending_images)
        self.pending_images.clear()
        return answer

    def _stream(
        self, job: GenerationJob, events: queue.SimpleQueue[Event], shown: list[str]
    ) -> tuple[Finished | Failed | None, bool]:
        """Print ``ASSISTANT:`` and ``job``'s deltas (collected in ``shown``) until it ends; Ctrl-C cancels it.
        Returns its last event (``None`` when a second Ctrl-C gave up waiting for the cancelled job to end) and
        whether Ctrl-C stopped it."""
        try:
            self.out.write("ASSISTANT: ")
            self.out.flush()
            while True:
                event = self._next(events)
                if isinstance(event, Delta):
                    shown.append(event.text)
                    self.out.write(event.text)
                    self.out.flush()
                elif event is not None:
                    return event, False
        except KeyboardInterrupt:
            job.cancel()
            self.out.write("\n[stopped]")
            self.out.flush()
        try:  # the row ends at its next step; text it made meanwhile is neither shown nor kept
            while True:
                event = self._next(events)
                if isinstance(event, Finished | Failed):
                    return event, True
        except KeyboardInterrupt:
            return None, True

    @staticmethod
    def _next(events: queue.SimpleQueue[Event]) -> Event | None:
        # SimpleQueue (C): Ctrl-C in get() cannot leave a Python-level lock held that the worker's put() needs.
        try:
            return events.get(timeout=POLL_S)
        except queue.Empty:
            return None

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _error(self, message: str) -> None:
        print(f"error: {message}", file=self.err, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description="Chat with a DuetLlava checkpoint in the terminal.")
    parser.add_argument("--model", required=True, help="checkpoint directory (merged, not a bare LoRA adapter)")
    parser.add_argument("--image", help="an image for the first message (more with /image PATH)")
    parser.add_argument(
        "--compression",
        help="visual-token compression preset (default: what the checkpoint was trained with; 'none' = off)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="sampling seed of every answer (default: a random one each)")
    parser.add_argument("--ignore-eos", action="store_true", help="always write --max-new-tokens tokens (testing)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--vision-tower", help="CLIP dir with the image processor (original LLaVA checkpoints)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("need --temperature >= 0 and 0 < --top-p <= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (see the module docstring)."""
    args = parse_args(argv)
    if args.image is not None and (problem := check_image(args.image)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        pipeline = load_pipeline(
            args.model, dtype=_DTYPES[args.dtype], device=args.device, vision_tower=args.vision_tower
        )
        engine = BatchingEngine(pipeline, compression=args.compression, max_batch=1, batch_wait_s=0)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    session = ChatSession(engine, max_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)  # fmt: skip
    if args.image is not None:
        session.pending_images.append(args.image)
    read_line = input
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    print(f"chatting with {args.model} (compression {engine.default_compression}); /help lists the commands")
    try:
        return session.run(read_line)
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
