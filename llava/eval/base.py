"""The interface every benchmark implements, and the errors it raises.

A benchmark reads its files in the layout of LLaVA's evaluation guide under an evaluation root (for
example ``playground/data/eval``), turns every question into an :class:`EvalItem` (prompt text with
LLaVA-1.5's suffixes, the media paths, the generation budget) and scores the generated answers with
its official metric. The runner owns everything else: batching, compression, sharding, resume.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's suffix for short-answer VQA (TextVQA, GQA, VQAv2, VizWiz)."""
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
"""LLaVA-1.5's suffix for multiple choice (ScienceQA, MMBench, SEED-Bench)."""

PROTOCOLS = ("official", "strict")
"""How answers are read when scoring. ``official`` (the default) reproduces the published scoring script of
each benchmark, quirks included, so numbers compare with published tables; ``strict`` is this project's
cleaner parsing. Benchmarks whose scoring has a single form accept both and score them alike."""


class EvalDataError(ValueError):
    """A benchmark file is missing or malformed; the message names the file (and question id)."""


@dataclass(frozen=True)
class EvalItem:
    """One question: what the model sees and what the metric needs.

    ``question_id`` is unique within the benchmark (a string, whatever the file uses). ``prompt`` is the
    user text without the conversation template or ``<image>`` tag, suffixes included. ``image`` and
    ``video`` are absolute paths (a list for several). ``reference`` holds whatever :meth:`Benchmark.score`
    needs (ground-truth answers, category, split, ...), JSON-serialisable.
    """

    question_id: str
    prompt: str
    image: str | list[str] | None = None
    video: str | list[str] | None = None
    max_new_tokens: int = 128
    reference: Mapping[str, Any] = field(default_factory=dict)

    def request(self) -> dict[str, Any]:
        """The :meth:`llava.pipeline.GenerationPipeline.generate` request of this question."""
        request: dict[str, Any] = {"prompt": self.prompt}
        if self.image is not None:
            request["image"] = self.image
        if self.video is not None:
            request["video"] = self.video
        return request


@dataclass
class Score:
    """A benchmark's result: the headline ``score`` (0-100 unless the metric says otherwise, e.g. MME's
    sum), its sub-scores, and how many questions were scored out of how many."""

    score: float
    metrics: dict[str, Any]
    num_scored: int
    num_questions: int

    @property
    def complete(self) -> bool:
        return self.num_scored == self.num_questions


@runtime_checkable
class Benchmark(Protocol):
    """What the runner needs from a benchmark module."""

    name: str
    """Registry name, e.g. ``textvqa``."""
    score_name: str
    """What :attr:`Score.score` is, e.g. ``VQA accuracy`` or ``perception (max 2000)``."""

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """All questions, in file order. ``root`` is the evaluation root; ``cache_dir`` a folder the
        benchmark may write derived files to (e.g. images decoded from a TSV). Raises
        :class:`EvalDataError` naming the file and question id on bad input; never reads outside ``root``."""
        ...

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """Score ``predictions`` (question id -> generated text) under ``protocol`` (one of
        :data:`PROTOCOLS`, ``ValueError`` otherwise; recorded as ``metrics["protocol"]``). Questions
        without a prediction are not scored (``num_scored`` says how many were).

        A benchmark may also have ``export_official(items, predictions, out_dir) -> list[Path]``, which
        writes the answers in the format its official scoring script or server reads and returns the files.

        A benchmark whose headline is not the mean of its questions' scores (each scored alone) may have
        ``resampling_units(items, predictions, protocol) -> llava.eval.stats.UnitStatistic | None``: its
        resampling units (questions, images, question groups, optionally in strata), each unit's statistics
        ``v_u`` and the vectorised ``h`` with ``h(sum_u v_u)`` equal to this headline, which
        :mod:`llava.eval.compare` resamples for intervals and paired tests (POPE, MME, MMBench).
        """
        ...


def check_protocol(protocol: str) -> str:
    """``protocol`` when it is one of :data:`PROTOCOLS`, else ``ValueError`` naming the choices."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return protocol


def with_protocol(score: Score, protocol: str) -> Score:
    """``score`` with ``metrics["protocol"]`` set, for benchmarks whose scoring is the same under every
    protocol (the result file still says which one was asked for)."""
    score.metrics["protocol"] = check_protocol(protocol)
    return score


def answered_items(
    items: Sequence[EvalItem], predictions: Mapping[str, str], name: str, consequence: str | None = None
) -> list[EvalItem]:
    """The items that have a prediction, in order (what an export writes). With ``consequence`` (what a gap
    means to the official script) the unanswered rest is counted in a warning."""
    answered = [item for item in items if item.question_id in predictions]
    if consequence is not None and len(answered) < len(items):
        logger.warning(
            "%s: %d of %d questions unanswered; %s", name, len(items) - len(answered), len(items), consequence
        )
    return answered


def llava_answer(question_id: Any, item: EvalItem, text: str, **extra: Any) -> dict[str, Any]:
    """One line of LLaVA's answer JSONL (what its ``model_vqa*.py`` write and its ``eval_*.py`` read):
    ``question_id`` as in LLaVA's question file, the ``prompt`` asked, the answer ``text``; ``extra`` fields
    after them."""
    return {"question_id": question_id, "prompt": item.prompt, "text": text, **extra}


def write_export(out_dir: Path, filename: str, records: Iterable[Any], name: str, json_lines: bool = True) -> Path:
    """Write ``records`` for an official script under ``out_dir`` (created): one JSON value per line, or
    with ``json_lines=False`` one JSON list; logs how many. Returns the file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    records = list(records)
    if json_lines:
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    else:
        text = json.dumps(records, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    logger.info("%s: wrote %d records to %s", name, len(records), path)
    return path


def read_json(path: Path) -> Any:
    """A JSON file, or :class:`EvalDataError` naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvalDataError(f"{path}: not valid UTF-8 JSON ({error})") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` per non-empty line of a JSONL file; :class:`EvalDataError` names the
    file and line of a malformed one."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below, errors reported per line
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise EvalDataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise EvalDataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                yield number, record
        except UnicodeDecodeError as error:
            raise EvalDataError(f"{path}: not valid UTF-8 ({error})") from None


def resolve_inside(root: Path, relative: str, what: str) -> str:
    """``root / relative`` as an absolute path, refusing paths that leave ``root`` (after symlinks)."""
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise EvalDataError(f"{what}: {relative!r} points outside {base}")
    return str(path)


def require_fields(record: Mapping[str, Any], names: Sequence[str], where: str) -> None:
    """:class:`EvalDataError` naming ``where`` when ``record`` lacks one of ``names``."""
    missing = [name for name in names if name not in record]
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)}")


def resolve_image(folder: Path, relative: str, where: str) -> str:
    """The absolute path of an image under ``folder``; :class:`EvalDataError` naming ``where`` (file and
    question id) when it points outside ``folder`` or does not exist, so a bad layout fails at load time
    rather than hours into generation."""
    path = resolve_inside(folder, relative, where)
    if not Path(path).is_file():
        raise EvalDataError(f"{where}: image {path} not found")
    return path


def require_unique(question_id: str, seen: set[str], where: str) -> None:
    """:class:`EvalDataError` when ``question_id`` was already loaded: predictions are keyed by it."""
    if question_id in seen:
        raise EvalDataError(f"{where}: duplicate question id {question_id}")
    seen.add(question_id)


def llava_questions(path: Path, image_folder: Path) -> Iterator[tuple[str, dict[str, Any], str, str]]:
    """LLaVA's question JSONL (``question_id``, ``image``, ``text`` per line) as ``(question id, record,
    absolute image path, where)``: ids unique, images inside ``image_folder`` and present, and every error
    naming the file, line and question id (``where``)."""
    seen: set[str] = set()
    for line_number, record in read_jsonl(path):
        question_id, where = check_llava_question(record, f"{path}:{line_number}")
        require_unique(question_id, seen, where)
        yield question_id, record, resolve_image(image_folder, record["image"], where), where


def check_llava_question(record: Mapping[str, Any], where: str) -> tuple[str, str]:
    """``(question id, where naming it)`` of one LLaVA question line, after checking its fields' types."""
    require_fields(record, ("question_id", "image", "text"), where)
    question_id = str(record["question_id"])
    where = f"{where}: question {question_id}"
    if not isinstance(record["image"], str) or not isinstance(record["text"], str):
        raise EvalDataError(f"{where}: 'image' and 'text' must be strings")
    return question_id, where
