"""Check, once the training engine exists, that the model's RoPE buffers are still float32.

The model is built with float32 rotary frequencies (:mod:`llava.model.precision`), but what trains is the
module after the Trainer has wrapped it: DeepSpeed casts the module to bf16/fp16 when its engine is built
(0.19 casts parameters only, unless the config sets ``data_types.buffer_dtype``). ``on_train_begin`` runs
after that, on the very module the engine steps, so this is the first moment the check means something.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llava.model.precision import check_buffer_precision

logger = logging.getLogger(__name__)


class BufferPrecisionCallback(TrainerCallback):
    """Stops a run whose engine rounded the RoPE frequencies (every position would be wrong in bf16)."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        check_buffer_precision(model, "training engine")
        rotary = [buffer for name, buffer in model.named_buffers() if name.endswith("inv_freq")]
        parameter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        logger.info(
            "Precision inside the training engine: parameters %s, %d RoPE buffers in %s",
            "/".join(parameter_dtypes),
            len(rotary),
            "/".join(sorted({str(buffer.dtype).removeprefix("torch.") for buffer in rotary})) or "-",
        )
