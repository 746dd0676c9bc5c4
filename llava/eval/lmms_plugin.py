"""lmms-eval (0.7.x) model plugin: ``lmms-eval --model duet_llava --model_args pretrained=CKPT,...``.

Requests are answered through the checkpoint's pipeline (:func:`~llava.inference.load_pipeline`), so prompts,
left padding, compression and decoding are exactly those of ``llava.tools.generate``: greedy answers do not
depend on ``batch_size``.

lmms-eval hands the plugin PIL images (``doc_to_visual``); the pipeline reads image files. Each
batch's PIL images are written as lossless PNGs to a temporary folder that is deleted after the
batch, so the pipeline is used unchanged and a plugin answer equals a pipeline answer on the same
pixels. The cost (a PNG encode per image) is small next to a forward pass.

lmms-eval finds ``--model`` names through its ``ModelRegistryV2``: declare :data:`MANIFEST` in the
``lmms_eval.models`` entry-point group, or call :func:`register` in-process. Nothing else in the
project imports this module, so lmms-eval stays an optional dependency.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.utils import simple_parse_args_string
from PIL import Image

from llava.data.tokenization import tokenize_text_with_images
from llava.hf_adapter import new_dynamic_cache
from llava.inference import Request, load_pipeline

logger = logging.getLogger(__name__)

MODEL_ID = "duet_llava"
MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path="llava.eval.lmms_plugin.DuetLlava")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_IGNORED_GEN_KWARGS = {"until", "num_beams", "max_new_tokens", "temperature", "top_p", "do_sample"}


def register(overwrite: bool = True) -> None:
    """Make ``duet_llava`` resolvable by name in this process (what the entry point does on install)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=overwrite)


def truncate_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` cut before the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _parse_optional_bool(value: bool | str | None, name: str) -> bool | None:
    """``--model_args`` values arrive as strings: true/false (any case), or unset."""
    if value is None or isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


class DuetLlava(lmms):
    """A DUET-LLaVA checkpoint as an lmms-eval model (simple, prompt-string interface)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        compression: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 128,
        fast_decoding: bool | str | None = None,
        **unused: Any,
    ) -> None:
        """``compression``: a preset name or ``none``; by default the checkpoint's own.
        ``dtype``: float32 (default), float16 or bfloat16. ``max_new_tokens`` applies when a task's
        generation_kwargs do not set it. ``fast_decoding``: true/false (default: on CUDA), see
        :mod:`llava.model.fast_generation`. Unknown keyword arguments are logged and ignored."""
        super().__init__()
        if unused:
            logger.warning("duet_llava ignores model_args %s", sorted(unused))
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.pipeline = load_pipeline(
            pretrained,
            dtype=_parse_dtype(dtype),
            device=device,
            compression=compression,
            fast_decoding=_parse_optional_bool(fast_decoding, "fast_decoding"),
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DuetLlava:
        """Like the base class, but ``--model_args`` win over the CLI's ``--batch_size``/``--device``
        (the CLI always passes ``batch_size=1``, which would otherwise clash with ``batch_size=8``)."""
        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.pop("max_batch_size", None)
        args.update(simple_parse_args_string(arg_string))
        return cls(**args)

    # ----- lmms-eval interface -----
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer every request, batched per distinct generation_kwargs; results in request order."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(position)
        for positions in groups.values():
            gen_kwargs = dict(requests[positions[0]].args[1])
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
                logger.warning("duet_llava does not do beam search; decoding with num_beams=1")
            temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
            do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
            options = {
                "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                "do_sample": do_sample,
                "temperature": temperature if do_sample else 1.0,
                "top_p": float(gen_kwargs.get("top_p", 1.0) or 1.0),
            }
            unknown = set(gen_kwargs) - _IGNORED_GEN_KWARGS
            if unknown:
                logger.warning("duet_llava ignores generation_kwargs %s", sorted(unknown))
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                with self._staged([requests[i] for i in chunk]) as staged:
                    texts = self.pipeline.generate(staged, batch_size=len(staged), **options)
                for position, text in zip(chunk, texts, strict=True):
                    answers[position] = truncate_at_stops(text, until)
        return [answer for answer in answers if answer is not None]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | image, context), continuation is the greedy decode)`` per request.

        The context becomes the user turn of a generation prompt (as for ``generate_until``) and
        the continuation is scored as the assistant's first tokens, teacher-forced through the
        same prefill + cached decode steps as generation, so the kept visual tokens are chosen from
        the prompt alone and ``is_greedy`` agrees with what ``generate_until`` would write. The
        continuation is tokenized on its own, as training tokenizes answers; include a leading
        space if it follows a word boundary.
        """
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            with self._staged(chunk) as staged:
                inputs = self.pipeline.prepare(staged)
            continuations = [self._continuation_ids(request) for request in chunk]
            results.extend(self._score(inputs, continuations))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported."""
        raise NotImplementedError("duet_llava does not implement generate_until_multi_round")

    # ----- helpers -----
    def _doc(self, request: Instance) -> Any:
        task, split, doc_id = request.args[4], request.args[5], request.args[3]
        return self.task_dict[task][split][doc_id]

    def _continuation_ids(self, request: Instance) -> list[int]:
        target = request.args[1]
        text = target(self._doc(request)) if callable(target) else target
        if isinstance(text, list | tuple):
            text = text[0]
        ids = tokenize_text_with_images(self.pipeline.tokenizer, str(text))
        if not ids:
            raise ValueError(f"empty continuation for request {request.metadata}")
        return ids

    @contextmanager
    def _staged(self, requests: Sequence[Instance]) -> Iterator[list[Request]]:
        """Pipeline requests for a batch of Instances, their PIL images saved in a temporary folder."""
        with tempfile.TemporaryDirectory(prefix="duet_lmms_") as folder:
            staged: list[Request] = []
            for number, request in enumerate(requests):
                doc_to_visual = request.args[2]
                visuals = doc_to_visual(self._doc(request)) if doc_to_visual is not None else None
                paths = []
                for index, visual in enumerate(visuals or []):
                    if isinstance(visual, Image.Image):
                        path = os.path.join(folder, f"{number}_{index}.png")
                        visual.convert("RGB").save(path)
                        paths.append(path)
                    elif isinstance(visual, str | os.PathLike) and os.path.isfile(visual):
                        paths.append(os.fspath(visual))
                    else:
                        raise TypeError(f"duet_llava takes PIL images or image paths, got {type(visual).__name__}")
                staged.append({"image": paths or None, "prompt": request.args[0]})
            yield staged

    @torch.no_grad()
    def _score(self, inputs: dict[str, torch.Tensor], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Teacher-forced log-probabilities of ``continuations`` after the left-padded prompts."""
        model = self.pipeline.model
        device = self.pipeline.device
        inputs = self.pipeline.to_device(inputs)
        width = max(len(ids) for ids in continuations)
        pad_id = self.pipeline._pad_id()
        targets = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in continuations], device=device)
        valid = torch.tensor([[step < len(ids) for step in range(width)] for ids in continuations], device=device)

        cache = new_dynamic_cache(model.language_model.config)
        out = model(
            **inputs,
            cache=cache,
            use_cache=True,
            left_padding=True,
            logits_to_keep=1,
        )
        step_logits = [out.logits[:, -1]]
        for step in range(width - 1):
            out = model(
                targets[:, step : step + 1],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                decode_state=out.decode_state,
            )
            step_logits.append(out.logits[:, -1])
        log_probs = torch.log_softmax(torch.stack(step_logits, dim=1).float(), dim=-1)
        token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        greedy = log_probs.argmax(dim=-1) == targets
        totals = (token_log_probs * valid).sum(dim=1)
        all_greedy = (greedy | ~valid).all(dim=1)
        return [(float(total), bool(is_greedy)) for total, is_greedy in zip(totals, all_greedy, strict=True)]
