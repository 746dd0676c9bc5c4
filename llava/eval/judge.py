"""The LLM judge of zero-shot video QA (the Video-ChatGPT / Video-LLaVA protocol), standard library only.

For every answered question the judge, any OpenAI-compatible chat-completions server, is shown the question,
the reference answer and the prediction, and replies with a Python-dict-like string ``{'pred': 'yes'|'no',
'score': 0-5}``. Requests that still fail after the retries are counted and reported, never guessed.

Two protocols (:data:`llava.eval.base.PROTOCOLS`):

- ``official`` (the default) is Video-ChatGPT's ``quantitative_evaluation/evaluate_*_qa.py``, which
  Video-LLaVA reuses: its system and user prompts verbatim (:data:`OFFICIAL_SYSTEM_PROMPT`,
  :func:`official_user_prompt`, quirks included: "task:------##INSTRUCTIONS: ", "is  a string",
  "STRING.DO NOT", the example score 4.8), no ``temperature`` sent unless :attr:`JudgeConfig.temperature`
  is set (the server's default, 1.0 for OpenAI), the whole reply read with ``ast.literal_eval`` (a reply
  that does not parse is asked again, up to ``max_retries`` times, where the official loop asks until it
  parses), the score truncated with ``int`` (4.8 -> 4), and the verdict "yes" when ``pred`` contains "yes",
  else "no" when it contains "no" (so "not sure" counts as no), else neither: counted in the mean score
  but not in the accuracy, yes / (yes + no).
- ``strict`` is this project's earlier reading: the same instructions laid out on lines, an integer
  example, ``temperature`` 0 unless set, the first ``{...}`` of the reply parsed, ``pred`` exactly yes/no
  and the score a number in 0-5 kept as it is; anything else is a failure and is not asked again.

Configuration: explicit arguments, else ``DUET_JUDGE_URL`` (base URL, e.g. ``http://localhost:8000/v1``),
``DUET_JUDGE_MODEL`` (default ``gpt-3.5-turbo``) and ``OPENAI_API_KEY`` (optional). The judge model shifts
accuracy by several points (Video-LLaVA #37): compare only numbers judged by the same model.
"""

from __future__ import annotations

import ast
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from llava.eval.base import EvalItem, check_protocol

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-3.5-turbo"

OFFICIAL_SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match "
    "meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
"""Video-ChatGPT's system prompt, character for character (data, not code: the numbers depend on it)."""

_OFFICIAL_USER_HEAD = "Please evaluate the following video-based question-answer pair:\n\n"
_OFFICIAL_USER_TAIL = (
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
    "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}."
)


def official_user_prompt(question: str, answer: str, prediction: str) -> str:
    """Video-ChatGPT's user prompt for one question, character for character."""
    return (
        f"{_OFFICIAL_USER_HEAD}Question: {question}\nCorrect Answer: {answer}\n"
        f"Predicted Answer: {prediction}\n\n{_OFFICIAL_USER_TAIL}"
    )


SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine "
    "if they match meaningfully. Here's how you can accomplish the task:\n"
    "------\n"
    "##INSTRUCTIONS:\n"
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
"""The ``strict`` protocol's system prompt: Video-ChatGPT's instructions laid out on lines."""

USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. Please generate the response in the form of a Python "
    "dictionary string with keys 'pred' and 'score', where value of 'pred' is a string of 'yes' or 'no' and "
    "value of 'score' is in INTEGER, not STRING. DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only "
    "provide the Python dictionary string. For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4}}."
)

_RETRYABLE = frozenset({408, 409, 429})
_DICT = re.compile(r"\{.*?\}", re.DOTALL)


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how to talk to it. ``url`` is the API base (``.../v1``) or the full
    ``.../chat/completions`` endpoint; ``max_retries`` retries follow a 429/5xx or a connection error, after
    ``backoff_s``, doubling each time; ``workers`` requests run at once."""

    url: str
    model: str = DEFAULT_MODEL
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0
    workers: int = 4
    temperature: float | None = None
    """Sent when set; unset, ``official`` sends none (the server's default) and ``strict`` sends 0."""

    @classmethod
    def from_env(
        cls, url: str | None = None, model: str | None = None, api_key: str | None = None, **options: Any
    ) -> JudgeConfig:
        """A config from the explicit arguments, else ``DUET_JUDGE_URL``, ``DUET_JUDGE_MODEL`` and
        ``OPENAI_API_KEY``; ``ValueError`` when no URL is given either way."""
        url = url or os.environ.get("DUET_JUDGE_URL")
        if not url:
            raise ValueError("no judge URL: pass url or set DUET_JUDGE_URL (e.g. http://localhost:8000/v1)")
        return cls(
            url=url,
            model=model or os.environ.get("DUET_JUDGE_MODEL") or DEFAULT_MODEL,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or None,
            **options,
        )

    @property
    def endpoint(self) -> str:
        """The chat-completions URL."""
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


class JudgeError(RuntimeError):
    """One question could not be judged (HTTP failure after retries, malformed response or reply)."""


def parse_judgement_official(reply: str) -> tuple[str, int]:
    """``(verdict, score)`` as Video-ChatGPT reads a reply: the whole reply as a Python literal
    (``ast.literal_eval``, never ``eval``), the score truncated by ``int`` (4.8 -> 4, "3" -> 3) and the
    verdict "yes" if ``pred`` contains "yes", else "no" if it contains "no", else "neither".
    :class:`JudgeError` where the official script would fail on the reply (and ask again)."""
    try:
        parsed = ast.literal_eval(reply)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise JudgeError(f"unparseable reply {reply[:200]!r}") from None
    if not isinstance(parsed, dict) or "pred" not in parsed or "score" not in parsed:
        raise JudgeError(f"reply is not a dictionary with 'pred' and 'score': {reply[:200]!r}")
    verdict, score = parsed["pred"], parsed["score"]
    if not isinstance(verdict, str):
        raise JudgeError(f"'pred' is not a string in {reply[:200]!r}")
    try:
        truncated = int(score)
    except (TypeError, ValueError, OverflowError):
        raise JudgeError(f"'score' {score!r} is not an integer for int() in {reply[:200]!r}") from None
    lowered = verdict.lower()
    return ("yes" if "yes" in lowered else "no" if "no" in lowered else "neither"), truncated


def parse_judgement(reply: str) -> tuple[bool, float]:
    """``(pred is yes, score)`` from a judge reply under the ``strict`` protocol: the first ``{...}`` in it
    read as JSON, else as a Python literal (``ast.literal_eval``, never ``eval``). :class:`JudgeError`
    unless it holds ``pred`` yes/no and a numeric ``score`` in 0-5."""
    match = _DICT.search(reply)
    if match is None:
        raise JudgeError(f"no dictionary in reply {reply[:200]!r}")
    text = match.group(0)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise JudgeError(f"unparseable reply {reply[:200]!r}") from None
    if not isinstance(parsed, dict):
        raise JudgeError(f"reply is not a dictionary: {reply[:200]!r}")
    verdict = str(parsed.get("pred", "")).strip().lower()
    if verdict not in ("yes", "no"):
        raise JudgeError(f"'pred' is not yes/no in {reply[:200]!r}")
    try:
        score = float(parsed.get("score"))
    except (TypeError, ValueError):
        raise JudgeError(f"'score' is not a number in {reply[:200]!r}") from None
    if not 0.0 <= score <= 5.0:
        raise JudgeError(f"'score' {score} outside 0-5 in {reply[:200]!r}")
    return verdict == "yes", score


def _post(config: JudgeConfig, payload: dict[str, Any]) -> dict[str, Any]:
    """The decoded JSON response to one chat-completions request, retrying 429/5xx and connection errors."""
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    data = json.dumps(payload).encode("utf-8")
    for attempt in range(config.max_retries + 1):
        request = urllib.request.Request(config.endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            error.close()
            retryable = error.code in _RETRYABLE or error.code >= 500
            if not retryable or attempt == config.max_retries:
                raise JudgeError(f"HTTP {error.code} from {config.endpoint}: {error.reason}") from None
            reason = f"HTTP {error.code}"
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
            if attempt == config.max_retries:
                raise JudgeError(f"cannot reach {config.endpoint}: {error}") from None
            reason = str(error)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise JudgeError(f"response from {config.endpoint} is not JSON ({error})") from None
        delay = config.backoff_s * 2**attempt
        logger.debug("judge request failed (%s); retry %d in %.2fs", reason, attempt + 1, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises on its last attempt


def sent_temperature(config: JudgeConfig, protocol: str) -> float | None:
    """The temperature sent to the judge: the configured one, else none under ``official`` (the server's
    default, as Video-ChatGPT's script) and 0 under ``strict``."""
    if config.temperature is not None:
        return config.temperature
    return None if check_protocol(protocol) == "official" else 0.0


def judge_request(
    question: str, answer: str, prediction: str, config: JudgeConfig, protocol: str = "official"
) -> dict[str, Any]:
    """The chat-completions payload sent for one question under ``protocol``."""
    if check_protocol(protocol) == "official":
        system, user = OFFICIAL_SYSTEM_PROMPT, official_user_prompt(question, answer, prediction)
    else:
        system, user = SYSTEM_PROMPT, USER_PROMPT.format(question=question, answer=answer, prediction=prediction)
    temperature = sent_temperature(config, protocol)
    payload: dict[str, Any] = {
        "model": config.model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }
    if temperature is not None:
        payload["temperature"] = temperature
    return payload


def _reply(config: JudgeConfig, payload: dict[str, Any]) -> str:
    response = _post(config, payload)
    try:
        reply = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"no choices[0].message.content in response {str(response)[:200]!r}") from None
    if not isinstance(reply, str):
        raise JudgeError(f"reply content is not text: {reply!r}")
    return reply


def judge_one(
    question: str, answer: str, prediction: str, config: JudgeConfig, protocol: str = "official"
) -> tuple[str, float]:
    """The judge's ``(verdict, score)`` for one question (verdict "yes", "no" or, ``official`` only,
    "neither"); :class:`JudgeError` when it cannot be had. Under ``official`` a reply that does not parse
    is asked again, up to ``config.max_retries`` times."""
    payload = judge_request(question, answer, prediction, config, protocol)
    if protocol == "strict":
        is_yes, score = parse_judgement(_reply(config, payload))
        return ("yes" if is_yes else "no"), score
    for attempt in range(config.max_retries + 1):
        reply = _reply(config, payload)  # a transport failure was already retried by _post
        try:
            verdict, truncated = parse_judgement_official(reply)
        except JudgeError as error:
            if attempt == config.max_retries:
                raise
            logger.debug("judge reply unparseable (%s); asking again", error)
            continue
        return verdict, float(truncated)
    raise AssertionError("unreachable")  # the loop returns or raises on its last attempt


def judge_answers(
    items: Sequence[EvalItem],
    predictions: Mapping[str, str],
    config: JudgeConfig | None = None,
    protocol: str = "official",
) -> dict[str, Any]:
    """Judge every item that has a prediction (question = ``item.prompt``, reference =
    ``item.reference["answer"]``) under ``protocol``. Returns ``accuracy`` (100 x yes / (yes + no), as the
    papers report it), ``score`` (mean 0-5 over every judged question), ``num_yes``, ``num_no``,
    ``num_neither`` (``official`` only can have them), ``num_judged``, ``num_failed``, ``num_questions``,
    ``judgements`` (question id -> ``{"pred", "score"}``), ``failures`` (question id -> reason), ``model``,
    ``protocol`` and ``temperature`` (``None``: none sent). ``config`` defaults to
    :meth:`JudgeConfig.from_env`."""
    check_protocol(protocol)
    config = config or JudgeConfig.from_env()
    todo = [item for item in items if item.question_id in predictions]
    judgements: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        futures = {
            pool.submit(
                judge_one,
                item.prompt,
                str(item.reference["answer"]),
                str(predictions[item.question_id]),
                config,
                protocol,
            ): item.question_id
            for item in todo
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="judge", unit="q"):
            question_id = futures[future]
            try:
                verdict, score = future.result()
            except JudgeError as error:
                failures[question_id] = str(error)
                logger.warning("judge failed on question %s: %s", question_id, error)
                continue
            judgements[question_id] = {"pred": verdict, "score": score}
    order = {item.question_id: index for index, item in enumerate(todo)}
    judgements = dict(sorted(judgements.items(), key=lambda entry: order[entry[0]]))
    failures = dict(sorted(failures.items(), key=lambda entry: order[entry[0]]))
    num_judged = len(judgements)
    num_yes = sum(judgement["pred"] == "yes" for judgement in judgements.values())
    num_no = sum(judgement["pred"] == "no" for judgement in judgements.values())
    if failures:
        logger.warning("judge: %d of %d questions could not be judged", len(failures), len(todo))
    return {
        "accuracy": 100.0 * num_yes / (num_yes + num_no) if num_yes + num_no else 0.0,
        "score": sum(judgement["score"] for judgement in judgements.values()) / num_judged if num_judged else 0.0,
        "num_yes": num_yes,
        "num_no": num_no,
        "num_neither": num_judged - num_yes - num_no,
        "num_judged": num_judged,
        "num_failed": len(failures),
        "num_questions": len(items),
        "judgements": judgements,
        "failures": failures,
        "model": config.model,
        "protocol": protocol,
        "temperature": sent_temperature(config, protocol),
    }
