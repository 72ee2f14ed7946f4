"""Hugging Face `transformers`: `Trainer(..., callbacks=[PDPTrainerCallback(model, PruningConfig(...))])`.

The callback attaches PDP when it is created, so that the Trainer saves and, on resume, loads the
pruned model's weights (its state is tensors only: safetensors takes it). It steps the schedule after
every optimizer step, writes the pruner state next to each Trainer checkpoint and reads it back when
training resumes from one, logs the model's sparsity, and finalizes when training ends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("PDPTrainerCallback needs transformers: pip install 'pdprune[transformers]'") from error
from torch import Tensor, nn

from pdprune.config import PruningConfig
from pdprune.pruner import PDPPruner

__all__ = ["PDPTrainerCallback", "STATE_FILE"]

STATE_FILE = "pdprune_pruner.json"


class PDPTrainerCallback(TrainerCallback):
    """PDP for a `transformers.Trainer`.

    Args:
        model: the model the Trainer trains (it is pruned in place).
        config: what to prune; set `config.schedule.steps_per_epoch` to the Trainer's optimizer steps
            per epoch (`len(train_dataloader) // gradient_accumulation_steps`), or leave it at 1 and
            the callback derives it when training begins.
        example_inputs: a batch the model accepts (needed for channel pruning only).
    """

    def __init__(self, model: nn.Module, config: PruningConfig | None = None, example_inputs: Tensor | None = None) -> None:
        self.model, self.config, self.example_inputs = model, config or PruningConfig(), example_inputs
        self.pruner = PDPPruner(model, self.config, example_inputs=example_inputs)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, train_dataloader=None, **kwargs) -> None:
        """Derive `steps_per_epoch` from the dataloader if it was left at 1; when resuming, load the pruner
        state saved next to the checkpoint.

        Raises:
            FileNotFoundError: resuming from a checkpoint that has no `pdprune_pruner.json`.
        """
        if self.config.schedule.steps_per_epoch == 1 and train_dataloader is not None:
            self.pruner.reschedule(max(1, len(train_dataloader) // args.gradient_accumulation_steps))
        if state.global_step > 0:  # resuming: the Trainer has loaded the weights and its own state
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(f"resuming at step {state.global_step} but {path} is missing: the checkpoint was not written with PDPTrainerCallback")
            self.pruner.load_state_dict(json.loads(path.read_text()))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Step the schedule after every optimizer step."""
        if not self.pruner.finalized:
            self.pruner.step()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Write the pruner state as `pdprune_pruner.json` into the checkpoint folder (main process, atomically)."""
        if self.pruner.finalized or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / (STATE_FILE + ".tmp")
        temporary.write_text(json.dumps(self.pruner.state_dict()))
        os.replace(temporary, folder / STATE_FILE)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kwargs) -> None:
        """Add the mean current sparsity of the units to the logs as `pdprune/sparsity`."""
        if logs is not None and not self.pruner.finalized:
            units = list(self.pruner.units)
            logs["pdprune/sparsity"] = sum(self.pruner.current_sparsity(name) for name in units) / max(len(units), 1)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Finalize: bake the hard masks into plain weights."""
        if not self.pruner.finalized:
            self.pruner.finalize()
