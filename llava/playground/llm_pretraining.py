"""Language pretraining of the tiny playground LLM: the scene questions with the scene told in words.

LLaVA starts from Vicuna, an LLM that already reads a question and looks up what it asks in its
context; LLaVA's stages only teach it to look at visual tokens. A random tiny LLM has to learn all of
that at once, and most of its early steps go to learning to read the question at all: the question is
a handful of tokens among ~600 visual ones. So the playground's LLM is pretrained, at build time and on
text only, on the same conversations (Vicuna v1 template, same questions and answers) with the
``<image>`` replaced by a sentence describing the scene. The visual half of the skill (finding the
answer among the visual tokens) is still learned only by LLaVA's own stages.

Samples come from freshly drawn scenes, never the playground's images or benchmark.
"""

from __future__ import annotations

import logging
import random

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from llava.constants import IGNORE_INDEX, IMAGE_TAG
from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.templates import conversation_to_turns, get_template
from llava.data.tokenization import tokenize_conversation
from llava.playground.scenes import caption, random_scene, vqa_sample

logger = logging.getLogger(__name__)


def text_conversation(rng: random.Random, rounds: int) -> list[dict[str, str]]:
    """A scene's VQA conversation with the image tag replaced by the scene's caption."""
    scene = random_scene(rng, "text.png")
    sample = vqa_sample(scene, rng, "text", rounds)
    conversation = [dict(turn) for turn in sample["conversations"]]
    conversation[0]["value"] = conversation[0]["value"].replace(IMAGE_TAG, f"Scene: {caption(scene)}")
    return conversation


def _batch(
    tokenizer: PreTrainedTokenizerBase, rng: random.Random, batch_size: int, rounds: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, attention_mask)`` of ``batch_size`` conversations, padded by the training collator."""
    template = get_template("v1")
    items = []
    for _ in range(batch_size):
        turns = conversation_to_turns(template, text_conversation(rng, rng.randint(*rounds)))
        encoded = tokenize_conversation(tokenizer, template, turns)
        items.append({key: torch.tensor(encoded[key], dtype=torch.long) for key in ("input_ids", "labels")})
    batch = DataCollatorForSupervisedDataset(tokenizer)(items)
    return batch["input_ids"], batch["labels"], batch["attention_mask"]


def pretrain_llm(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    steps: int = 600,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    rounds: tuple[int, int] = (5, 7),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place on text-told scene conversations; returns the first and last losses and
    the answer-token accuracy on a held-out text batch."""
    torch.manual_seed(seed)
    rng = random.Random(f"llm-{seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    model.train()
    first_loss = last_loss = float("nan")
    for step in tqdm(range(steps), desc="LLM text pretraining", unit="step", disable=not progress):
        input_ids, labels, attention_mask = _batch(tokenizer, rng, batch_size, rounds)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        last_loss = float(loss.detach())
        if step == 0:
            first_loss = last_loss
    model.eval()
    with torch.no_grad():
        input_ids, labels, attention_mask = _batch(tokenizer, rng, 64, rounds)
        predicted = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        answered = target != IGNORE_INDEX
        accuracy = float((predicted[answered] == target[answered]).float().mean())
    logger.info(
        "LLM text pretraining: %d steps, loss %.3f -> %.3f, held-out answer-token accuracy %.1f %%",
        steps, first_loss, last_loss, 100 * accuracy,
    )  # fmt: skip
    return {"steps": steps, "first_loss": first_loss, "final_loss": last_loss, "answer_token_accuracy": accuracy}
