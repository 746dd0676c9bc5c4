"""A toy causal LM and data set for Trainer-callback tests (no vision, milliseconds per step)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class ToyLM(nn.Module):
    """Embedding + linear head returning ``{"loss": ...}`` like an HF causal LM."""

    def __init__(self, vocab: int = 16, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embed(input_ids))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


class ToyData(Dataset):
    """Fixed-length random token rows whose last ``padding`` positions are padding."""

    def __init__(self, n: int = 16, length: int = 6, vocab: int = 16, padding: int = 2) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))
        self.length = length
        self.padding = padding

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(self.length, dtype=torch.long)
        mask[-self.padding :] = 0
        labels = self.ids[i].masked_fill(mask == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": labels}
