"""Hugging Face `transformers`: `Trainer(..., callbacks=[PDPTrainerCallback(model, PruningConfig(...))])`.

The callback attaches PDP when it is created, so that the Trainer saves and, on resume, loads the
pruned model's weights (its state is tensors only: safetensors takes it). It steps the schedule after
every optimizer step, keeps the pruner state in the Trainer's own state (so each checkpoint's
`trainer_state.json` holds it, and resuming reads it from the checkpoint resumed from, wherever that
lies), logs the model's sparsity, and finalizes when training ends.
"""

from __future__ import annotations

import math

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import has_length
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("PDPTrainerCallback needs transformers: pip install 'pdprune[transformers]'") from error
from torch import Tensor, nn

from pdprune.config import PruningConfig
from pdprune.pruner import PDPPruner

__all__ = ["PDPTrainerCallback", "STATE_KEY"]

STATE_KEY = "pdprune"  # the pruner state's entry in TrainerState.stateful_callbacks


class PDPTrainerCallback(TrainerCallback):
    """PDP for a `transformers.Trainer`.

    Args:
        model: the model the Trainer trains (it is pruned in place).
        config: what to prune; set `config.schedule.steps_per_epoch` to the Trainer's optimizer steps
            per epoch, or leave it at 1 and the callback derives it when training begins (as the Trainer
            counts them: the batches divided by `gradient_accumulation_steps`, rounded up).
        example_inputs: a batch the model accepts (needed for channel pruning only).
    """

    def __init__(self, model: nn.Module, config: PruningConfig | None = None, example_inputs: Tensor | None = None) -> None:
        self.model, self.config, self.example_inputs = model, config or PruningConfig(), example_inputs
        self.pruner = PDPPruner(model, self.config, example_inputs=example_inputs)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, train_dataloader=None, **kwargs) -> None:
        """Derive `steps_per_epoch` from the dataloader if it was left at 1; when resuming, load the pruner
        state from the Trainer state the checkpoint restored. A later `train()` fine-tunes the pruned
        model as it is.

        Raises:
            ValueError: resuming from a checkpoint written without this callback (no pruner state in it), or
                a dataloader without a length (a streaming dataset) and `steps_per_epoch` left at 1.
        """
        if self.pruner.finalized:
            return
        if self.config.schedule.steps_per_epoch == 1 and train_dataloader is not None:
            if not has_length(train_dataloader):
                raise ValueError("the train dataloader has no length (a streaming dataset), so PDPTrainerCallback cannot count the "
                                 "optimizer steps of an epoch: set them, PruningConfig(schedule=ScheduleConfig(steps_per_epoch=...)), "
                                 "and give the schedule's epochs in those units")
            self.pruner.reschedule(max(1, math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)))
        if state.global_step > 0:  # resuming: the Trainer has loaded the weights and its own state
            saved = (state.stateful_callbacks or {}).get(STATE_KEY)
            if saved is None:
                raise ValueError(f"resuming at step {state.global_step} from a checkpoint without pdprune's state (its trainer_state.json "
                                 f"has no stateful_callbacks[{STATE_KEY!r}]): it was not written with PDPTrainerCallback")
            self.pruner.load_state_dict(saved)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Step the schedule after every optimizer step, and put the pruner state into the Trainer state,
        which the checkpoint that may follow saves (under any save strategy)."""
        if not self.pruner.finalized:
            self.pruner.step()
            state.stateful_callbacks[STATE_KEY] = self.pruner.state_dict()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kwargs) -> None:
        """Add the mean current sparsity of the units to the logs as `pdprune/sparsity`."""
        if logs is not None and not self.pruner.finalized:
            units = list(self.pruner.units)
            logs["pdprune/sparsity"] = sum(self.pruner.current_sparsity(name) for name in units) / max(len(units), 1)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Finalize: bake the hard masks into plain weights."""
        if not self.pruner.finalized:
            self.pruner.finalize()
