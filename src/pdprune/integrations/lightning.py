"""PyTorch Lightning: `Trainer(callbacks=[PDPCallback(PruningConfig(sparsity=0.9))])`.

Attaches PDP in `setup` (before Lightning restores a checkpoint, so the pruned model's state loads),
steps the schedule after every optimizer step, logs each unit's sparsity per epoch, keeps the pruner
state inside Lightning's checkpoints, and finalizes when training ends.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

try:
    import lightning as L
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("PDPCallback needs Lightning: pip install 'pdprune[lightning]'") from error
from torch import Tensor

from pdprune.config import PruningConfig
from pdprune.pruner import PDPPruner

__all__ = ["PDPCallback"]


class PDPCallback(L.Callback):
    """PDP for a LightningModule.

    Args:
        config: what to prune; its `schedule.steps_per_epoch`, left at 1, is set from the trainer (its
            batches per epoch over `accumulate_grad_batches`, rounded up).
        example_inputs: a batch the module accepts (needed for channel pruning only).
        submodule: the attribute of the LightningModule to prune (default: the whole module).
    """

    def __init__(self, config: PruningConfig | None = None, example_inputs: Tensor | None = None, submodule: str | None = None) -> None:
        self.config = config or PruningConfig()
        self.example_inputs = example_inputs
        self.submodule = submodule
        self.pruner: PDPPruner | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Attach the pruner when fitting starts, with `steps_per_epoch` (left at 1) from the trainer's
        optimizer steps per epoch.

        Raises:
            ValueError: a train dataloader without a length (an IterableDataset) and `steps_per_epoch` left at 1.
        """
        if stage != "fit" or self.pruner is not None:
            return
        config = self.config
        if config.schedule.steps_per_epoch == 1:
            trainer.estimated_stepping_batches  # sets the train dataloader up, and with it num_training_batches
            if not math.isfinite(trainer.num_training_batches):
                raise ValueError("the train dataloader has no length (an IterableDataset), so PDPCallback cannot count the optimizer "
                                 "steps of an epoch: set them, PruningConfig(schedule=ScheduleConfig(steps_per_epoch=...))")
            steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
            config = replace(config, schedule=replace(config.schedule, steps_per_epoch=steps_per_epoch))
        target = pl_module if self.submodule is None else pl_module.get_submodule(self.submodule)
        self.pruner = PDPPruner(target, config, example_inputs=self.example_inputs)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Step the schedule once per optimizer step taken (none on a batch that only accumulates gradients)."""
        while self.pruner is not None and not self.pruner.finalized and self.pruner.schedule.steps_done < trainer.global_step:
            self.pruner.step()  # one step per optimizer step, also under gradient accumulation

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log each unit's current sparsity as `pdprune/sparsity/<unit>`."""
        if self.pruner is None or self.pruner.finalized:
            return
        metrics = {f"pdprune/sparsity/{name}": self.pruner.current_sparsity(name) for name in self.pruner.units}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Finalize: bake the hard masks into plain weights, and log the final sparsity."""
        if self.pruner is not None and not self.pruner.finalized:
            self.pruner.finalize()
            if trainer.logger is not None:
                trainer.logger.log_metrics({"pdprune/final_sparsity": self.pruner.report().sparsity}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        """The pruner's state for Lightning's checkpoint (empty once finalized)."""
        return {} if self.pruner is None or self.pruner.finalized else self.pruner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the pruner from a Lightning checkpoint (the pruner was attached in `setup`)."""
        if state_dict and self.pruner is not None:
            self.pruner.load_state_dict(state_dict)
