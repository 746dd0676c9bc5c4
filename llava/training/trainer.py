"""``LlavaTrainer``: the HF Trainer plus LLaVA's sampler, projector learning rate and batch bookkeeping.

Only public extension points are overridden (``_get_train_sampler`` is the documented hook for
a custom sampler; ``create_optimizer``, ``compute_loss`` and ``save_model`` are public).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from llava.data.sampler import ModalityLengthGroupedSampler
from llava.families.base import ModelFamily
from llava.families.registry import family_of_model
from llava.training.fault_injection import armed_faults, corrupt_loss, fail_save
from llava.training.metrics import MetricsCallback, batch_counts
from llava.training.nonfinite import SKIPPED_STEPS_KEY, STOP, NonFiniteGuard

logger = logging.getLogger(__name__)


def _base_model(model: nn.Module) -> nn.Module:
    """The model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


class LlavaTrainer(Trainer):
    """Trainer with modality/length-grouped batches, a separate projector LR, skip accounting and the
    non-finite guard (``--nonfinite``, :mod:`llava.training.nonfinite`)."""

    def __init__(
        self,
        *args: Any,
        group_by_modality_length: bool = False,
        metrics: MetricsCallback | None = None,
        processors: Any = None,
        family: ModelFamily | None = None,
        **kwargs: Any,
    ) -> None:
        # First of the run's callbacks: a non-finite step stops before another callback acts on it (a save).
        self.nonfinite = NonFiniteGuard(engine=lambda: self.deepspeed)
        kwargs["callbacks"] = [self.nonfinite, *(kwargs.get("callbacks") or ())]
        super().__init__(*args, **kwargs)
        self.nonfinite.policy = getattr(self.args, "nonfinite", STOP)
        self.nonfinite.max_skips = getattr(self.args, "max_nonfinite_skips", self.nonfinite.max_skips)
        self.nonfinite.data_files = tuple(getattr(self.train_dataset, "files", ()))
        self.faults = armed_faults()  # test-only (DUET_INJECT_FAULT); empty in real runs
        self.family = family  # what a batch adds to the visual tokens; found from the model when not given
        self.processors = processors  # saved with every checkpoint of a model saved in its own layout
        self.group_by_modality_length = group_by_modality_length
        self.metrics = metrics
        self.num_skipped_samples = 0
        self._compression_sums: dict[str, float] = {}
        self._compression_batches = 0
        self._text_only_samples = 0  # samples without image or video since the last log, and all samples
        self._logged_samples = 0
        self._packing_announced = False

    def visual_tokens_in(self, inputs: dict[str, Any]) -> int:
        """Visual tokens the batch adds to the LLM sequence before compression, as the model's family counts
        them (LLaVA: each image slot becomes ``tokens_per_image`` tokens, each video slot frames x
        ``tokens_per_frame``; Qwen2.5-VL: none, its placeholders are expanded in ``input_ids`` already)."""
        model = self.accelerator.unwrap_model(self.model)
        if self.family is None:
            self.family = family_of_model(_base_model(model))
        return self.family.visual_tokens_added(inputs, model.config)

    def saves_own_layout(self) -> bool:
        """Whether :meth:`save_model` writes the model in its own layout, processors included (models that are
        neither a ``PreTrainedModel`` nor a peft model, e.g. Qwen2.5-VL's wrapper)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        return not (isinstance(unwrapped, PreTrainedModel) or hasattr(unwrapped, "peft_config"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save a model that is not a ``PreTrainedModel`` but has its own ``save_pretrained`` (Qwen2.5-VL's
        wrapper) in that layout, with the processors, at the end and in every checkpoint, so each loads for
        evaluation: the Trainer would write its raw state dict, which no loader reads. The state dict is
        gathered from every rank under ZeRO-3."""
        self._save_model(output_dir, _internal_call)
        if self.faults:  # test-only: a full disk after the model files are written
            target = output_dir if output_dir is not None else self.args.output_dir
            fail_save(target, self.faults, self.state.global_step, self.args.process_index)

    def _save_model(self, output_dir: str | None, _internal_call: bool) -> None:
        """The save itself, as :meth:`save_model` describes it (which adds the test-only fault hook)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not self.saves_own_layout():
            super().save_model(output_dir, _internal_call)
            return
        if not hasattr(unwrapped, "save_pretrained"):
            raise TypeError(f"{type(unwrapped).__name__} has no save_pretrained: the trainer cannot save it")
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        try:
            state_dict = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model)
        except ValueError as error:  # ZeRO-3 without gathering on save: the full weights exist nowhere
            raise ValueError(
                f"cannot save {type(unwrapped).__name__} to {output_dir}: under ZeRO-3 the DeepSpeed config needs "
                '"stage3_gather_16bit_weights_on_model_save": true (scripts/zero3*.json have it)'
            ) from error
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        if self.processors is not None:
            self.processors.save(output_dir)
        elif self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # the Trainer's file name

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_modality_length:
            return super()._get_train_sampler(dataset)
        return ModalityLengthGroupedSampler(
            batch_size=self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            lengths=dataset.modality_lengths,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW groups: (decay, no decay) x (projector at ``mm_projector_lr``, the rest)."""
        projector_lr = getattr(self.args, "mm_projector_lr", None)
        if projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault(("projector" in name, name in decay), []).append(parameter)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if is_decay else 0.0,
                **({"lr": projector_lr} if is_projector else {}),
            }
            for (is_projector, is_decay), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        skipped = inputs.pop("num_skipped_samples", 0)
        sample_ids = inputs.pop("sample_ids", None)  # for the non-finite guard's message, not for the model
        if skipped:
            self.num_skipped_samples += int(skipped)
        if self.metrics is not None and model.training:
            num_samples, num_text_tokens = batch_counts(inputs)
            self.metrics.record_batch(num_samples, num_text_tokens + self.visual_tokens_in(inputs))
            self._count_text_only(inputs, num_samples)
        has_visual = inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None
        if getattr(self.args, "packing", False):
            if not self._packing_announced:
                logger.info("Padding-free batches (--packing): the LLM layers run on each batch's real tokens only")
                self._packing_announced = True
            inputs = {**inputs, "pack_sequences": True}
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training:
            if self.faults:  # test-only: a NaN loss (and so NaN gradients) at one step
                loss = corrupt_loss(loss, self.faults, self.state.global_step + 1, self.args.process_index)
            self.nonfinite.record(loss, sample_ids)
        if model.training and has_visual:  # text-only batches say nothing about visual tokens
            self._record_compression(outputs)
        return (loss, outputs) if return_outputs else loss

    def _count_text_only(self, inputs: dict[str, Any], num_samples: int) -> None:
        """Count the batch's samples without an image or video slot: logged as ``text_only_fraction``, it
        explains the loss jumps of modality-grouped batches (a text-only batch has a different loss)."""
        config = self.accelerator.unwrap_model(self.model).config
        input_ids = inputs["input_ids"]
        names = ("image_token_id", "video_token_id")  # a family without videos (LLaVA-NeXT) has no video token
        placeholders = [token for name in names if (token := getattr(config, name, None)) is not None]
        has_visual = torch.isin(input_ids, torch.tensor(placeholders, device=input_ids.device))
        self._text_only_samples += num_samples - int(has_visual.any(dim=1).sum())
        self._logged_samples += num_samples

    def _record_compression(self, outputs: Any) -> None:
        """Accumulate visual tokens per LLM layer (per image or video) and compression seconds until the next log."""
        per_layer = outputs.get("visual_tokens_per_layer") if isinstance(outputs, dict) else None
        if not per_layer:
            return
        starts = outputs["decode_state"].stage_starts  # first layer of each stage, from the forward itself
        stats = {"visual_tokens_avg": sum(per_layer) / len(per_layer)}
        stats.update({f"visual_tokens_stage{index}": per_layer[start] for index, start in enumerate(starts)})
        stats["compression_time_s"] = float(outputs.get("compression_time_s") or 0.0)
        for key, value in stats.items():
            self._compression_sums[key] = self._compression_sums.get(key, 0.0) + value
        self._compression_batches += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the averaged compression statistics of the logging interval to the Trainer's logs, and the
        non-finite guard's count; a non-finite loss is logged as such (the Trainer's filter replaced it)."""
        if "loss" in logs:
            nonfinite_loss = self.nonfinite.take_logged_loss()
            if nonfinite_loss is not None:
                logs["loss"] = nonfinite_loss
            logs[SKIPPED_STEPS_KEY] = self.nonfinite.skipped_steps
        if self._logged_samples and "loss" in logs:
            logs["text_only_fraction"] = self._text_only_samples / self._logged_samples
            self._text_only_samples = self._logged_samples = 0
        if self._compression_batches and "loss" in logs:
            for key, total in self._compression_sums.items():
                logs[key] = total / self._compression_batches
            self._compression_sums, self._compression_batches = {}, 0
        super().log(logs, *args, **kwargs)
