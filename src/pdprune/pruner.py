"""PDPPruner: attaches PDP's soft masks to a model, steps the schedule, finalizes to exact sparsity.

    pruner = PDPPruner(model, PruningConfig(sparsity=0.9, schedule=ScheduleConfig(steps_per_epoch=len(loader))))
    ...  optimizer.step(); pruner.step()      # after every optimizer step
    pruner.finalize()                          # plain nn.Module, exactly 90% zeros

A *unit* is what one threshold decides over: a weight tensor (unstructured or N:M, named like
`layer1.0.conv1.weight`) or a group of coupled channels (named after its first producing module).
"""

from __future__ import annotations

import numbers
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from pdprune._version import __version__
from pdprune.attach import attach, check_finite, qualified_name, remove_masks
from pdprune.config import PruningConfig
from pdprune.masks import batched_order_statistics, inverse_temperature, midpoint
from pdprune.model_io import has_batchnorm
from pdprune.parametrizations import ChannelGroup, ChannelMask, NMMask, SoftMask, UnstructuredMask, in_mask_dtype
from pdprune.report import GroupSparsity, LayerSparsity, SparsityReport
from pdprune.schedule import Schedule, global_budgets, lamp_budgets, uniform_budgets

__all__ = ["PDPPruner"]

STATE_FORMAT = 1
HARD_CUT_WARNING = 0.01
"""finalize() warns when the hard cut removes more than this fraction of a tensor's effective weight energy
(ResNet-20 at 1:4: 1.4% cost six points; 90% unstructured: 0.1% cost nothing; benchmarks/study_histories.py)."""


_ATTACHED: weakref.WeakSet[PDPPruner] = weakref.WeakSet()
_OPTIMIZER_HOOK: Any = None
_OPTIMIZER_STEPS = 0


def _after_any_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The optimizer's weights just changed: every attached pruner recomputes the thresholds of those it
    masks, so the next forward pass is exact even if `step()` comes once per epoch only, or under
    `torch.compile`, where a forward pass cannot check. (Fused optimizers change weights without
    bumping their version counters, so nothing short of this hook sees every update.)"""
    global _OPTIMIZER_STEPS
    _OPTIMIZER_STEPS += 1
    pruners = list(_ATTACHED)
    if pruners:
        parameters = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
        for pruner in pruners:
            pruner._refresh(force=True, parameters=parameters)


class _RefreshAfterLoading:
    """A post-hook for the model's `load_state_dict`: new weights need new thresholds, which are not part of
    the state (a compiled forward pass cannot recompute them, and the pruner's own state may have been
    loaded first). Picklable, so that `torch.save(model)` reaches PyTorch's own error about parametrized
    modules; a pickled copy leaves the pruner behind."""

    def __init__(self, pruner: PDPPruner) -> None:
        self.pruner: weakref.ref[PDPPruner] | None = weakref.ref(pruner)

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        attached = None if self.pruner is None else self.pruner()
        if attached is not None and not attached.finalized:
            attached.refresh()

    def __getstate__(self) -> dict[str, Any]:
        return {"pruner": None}


class PDPPruner:
    """Parameter-free Differentiable Pruning (Cho et al., NeurIPS 2023) on a PyTorch model.

    Creating the pruner attaches a soft mask to every selected weight; `step()` advances the schedule;
    `finalize()` bakes the exact hard mask into plain weights and detaches. The dense weights stay the
    only trainable parameters.

    Args:
        model: any `nn.Module`; it is modified in place.
        config: what to prune; `PruningConfig()` (90% unstructured, global) if None.
        example_inputs: a batch the model accepts; needed only for the "channel" structure, to trace
            which channels are coupled: a tensor, a tuple of positional tensors, or a dict of keyword
            tensors (a Hugging Face batch).

    Raises:
        TypeError: `config` is not a PruningConfig (a sparsity, a dict: the message says how to build one).
        ValueError, RuntimeError: what `attach` refuses, or anything failing once the masks are on (the
            first budgets); either way the model is left as it was.
    """

    def __init__(self, model: nn.Module, config: PruningConfig | None = None, example_inputs: Any = None) -> None:
        _check_config(config)
        self.model = model
        self.config = config if config is not None else PruningConfig()
        self.schedule = Schedule(self.config.schedule)
        self.budgets: dict[str, float] | None = None
        self.finalized = False
        self.hard_cut: dict[str, float] = {}  # after finalize: fraction of each tensor's effective energy cut
        orders = {id(module): list(module._parameters) for module in model.modules()}
        attached = attach(model, self.config, example_inputs)
        self._tensors = attached.tensors  # tensor name -> (module, "weight"/"bias"), every parametrized tensor
        self._parameter_orders = [(module, orders[id(module)]) for module in {id(m): m for m, _ in self._tensors.values()}.values()]
        try:  # the masks are on the model now: any failure before the pruner exists takes them off again
            self.units, self.skipped = attached.units, attached.skipped
            self._group_members = attached.group_members  # group -> its gated tensors
            self._masks = [(unit, self._tensors[name][0].parametrizations[self._tensors[name][1]]) for name, unit in self.units.items()
                           if isinstance(unit, SoftMask)]  # (mask, its ParametrizationList): what refresh() visits
            self._optimizer_steps_seen = _OPTIMIZER_STEPS
            self._update_sparsities()
        except BaseException:
            _remove_masks(self._tensors, self._parameter_orders)
            raise
        self._load_hook = model.register_load_state_dict_post_hook(_RefreshAfterLoading(self))
        global _OPTIMIZER_HOOK
        _ATTACHED.add(self)
        if _OPTIMIZER_HOOK is None:
            _OPTIMIZER_HOOK = register_optimizer_step_post_hook(_after_any_optimizer_step)

    @property
    def tensor_names(self) -> list[str]:
        """Fully-qualified names of the pruned tensors (weights, and biases/norms of channel groups)."""
        return list(self._tensors)

    def step(self) -> None:
        """Advance the schedule by one step; call after every `optimizer.step()` (or once per epoch)."""
        self._check_attached("step()")
        self.schedule.step()
        self._update_sparsities()

    def current_sparsity(self, unit: str) -> float:
        """The sparsity the soft mask of `unit` (a tensor or channel-group name) applies now."""
        return self.units[unit].sparsity

    def _update_sparsities(self) -> None:
        if self.schedule.in_warmup:
            fraction = 0.0
        else:
            if self.schedule.allocation_due:
                self.budgets = self._allocate()
                self.schedule.allocated_epoch = int(self.schedule.epoch)
            fraction = self.schedule.ramp_fraction
        temperature = self.config.temperature * self.schedule.temperature_factor
        for name, unit in self.units.items():
            unit.sparsity = 0.0 if self.budgets is None else fraction * self.budgets[name]
            unit.set_temperature(temperature, self.config.temperature)
        # An optimizer's step refreshed every threshold already (its hook) unless the weights changed by
        # other means since the last step(): then everything is recomputed. Either way, the units whose
        # pruned count just changed are.
        self._refresh(force=_OPTIMIZER_STEPS == self._optimizer_steps_seen)
        self._optimizer_steps_seen = _OPTIMIZER_STEPS

    def refresh(self) -> None:
        """Recompute every threshold from the current weights.

        `step()` does, and so do every `torch.optim` optimizer's `step()` and the model's `load_state_dict`
        while the pruner is attached; call it yourself after changing weights by other means: through `p.data` (which bumps no version
        counter, so nothing can notice), or before a forward pass under `torch.compile` (an eager forward
        pass refreshes a weight changed in place under `torch.no_grad()` by itself).
        """
        self._refresh(force=True)

    def _refresh(self, force: bool, parameters: set[int] | None = None) -> None:
        """Refresh the masks of `parameters` (ids; all if None): all of them if `force`, else the stale
        ones. The arithmetic after the selections runs once for all tensors together; on a GPU the
        selections too (one sort, no host synchronization)."""
        if self.finalized:
            return
        pairs: list[tuple[UnstructuredMask, Tensor, Tensor]] = []  # (mask, largest pruned, smallest kept)
        on_gpu: list[tuple[UnstructuredMask, Tensor, int]] = []
        fresh: list[tuple[SoftMask, Tensor]] = []
        gathered: list[tuple[SoftMask, Tensor]] = []
        for mask, chain in self._masks:
            original = chain.original
            if parameters is not None and id(original) not in parameters:
                continue
            sharded = hasattr(original, "full_tensor")  # FSDP2
            if sharded and not mask.compiled_forward:
                mask.mark_stale()  # the eager forward pass refreshes from the weight FSDP2 gathers for it
                continue
            if not force and not mask.is_stale(original):
                continue
            if sharded:  # a compiled forward pass cannot refresh: gather here (every rank steps together)
                original = original.full_tensor()
                gathered.append((mask, original))
            if not isinstance(mask, UnstructuredMask):
                mask.refresh(original)
                continue
            fresh.append((mask, original))
            pruned = mask.pruned_of(original)
            if original.is_cuda and original.dtype != torch.float64 and 0 < pruned < original.numel():
                on_gpu.append((mask, original, pruned))
                continue
            selected = mask.selection(original.detach())
            if isinstance(selected, float):
                mask.threshold_squared.fill_(selected)
            else:
                pairs.append((mask, *selected))
        with torch.no_grad():
            if on_gpu:
                largest_pruned, smallest_kept = batched_order_statistics([in_mask_dtype(w).square() for _, w, _ in on_gpu], [p for _, _, p in on_gpu])
                _write([mask.threshold_squared for mask, _, _ in on_gpu], midpoint(largest_pruned, smallest_kept).square())
            if pairs:
                largest_pruned, smallest_kept = torch.stack([a for _, a, _ in pairs]), torch.stack([b for _, _, b in pairs])  # (T,) each
                _write([mask.threshold_squared for mask, _, _ in pairs], midpoint(largest_pruned, smallest_kept).square())
        for mask, original in fresh:
            mask.coefficients_stale = True
            mask.mark_fresh(original)
        for mask, original in gathered:
            mask.mark_gathered(mask.pruned_of(original))
        for unit in self.units.values():
            if not isinstance(unit, ChannelGroup):
                continue
            if parameters is not None and not any(id(piece.tensor()) in parameters for piece in unit.slices("scoring")):
                continue
            sharded = any(hasattr(piece.tensor(), "full_tensor") for piece in unit.slices("scoring"))
            if sharded and not unit.compiled_forward:
                unit.mark_stale()  # as for the tensors above
                continue
            if force or unit.is_stale():
                unit.refresh()  # gathers sharded tensors
                if sharded:
                    unit.mark_gathered(unit.pruned(unit.sparsity))
        self._update_coefficients()

    def _update_coefficients(self) -> None:
        """Fold the temperature and t^2 into 1 / tau for every unit whose either changed, all at once."""
        stale = [unit for unit in self.units.values() if unit.coefficients_stale and unit.inverse_tau is not None]
        if not stale:
            return
        relative = self.config.temperature_mode == "relative"
        with torch.no_grad():
            thresholds = torch.stack([unit.threshold_squared for unit in stale])  # (T,)
            _write([unit.inverse_tau for unit in stale], inverse_temperature(thresholds, stale[0].temperature, relative))
            if stale[0].slope_inverse_tau is not None:
                _write([unit.slope_inverse_tau for unit in stale], inverse_temperature(thresholds, stale[0]._gradient_temperature, relative))
        for unit in stale:
            unit.coefficients_stale = False

    def _allocate(self) -> dict[str, float]:
        """Per-unit budgets: fixed for N:M, `sparsity` for channel groups, global or uniform for the rest."""
        check_finite(self._originals())
        budgets, free = {}, {}
        for name, unit in self.units.items():
            if isinstance(unit, NMMask):
                budgets[name] = 1 - unit.n / unit.m
            elif isinstance(unit, ChannelGroup):
                budgets[name] = self.config.sparsity
            else:
                free[name] = self._original(name)
        if self.config.allocation == "uniform":
            budgets |= uniform_budgets({name: w.numel() for name, w in free.items()}, self.config.sparsity)
        else:
            allocate = global_budgets if self.config.allocation == "global" else lamp_budgets
            budgets |= allocate({name: in_mask_dtype(w.detach()).square() for name, w in free.items()}, self.config.sparsity)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            shared = [budgets]  # computed once, on rank 0, so that every rank prunes the same weights
            torch.distributed.broadcast_object_list(shared, src=0)
            budgets = shared[0]
        emptied = [name for name, budget in budgets.items() if budget >= 1.0]
        if emptied:
            remedy = ("Train dense first (warmup_epochs >= 1), keep the default allocation='lamp', or exclude them"
                      if self.config.allocation == "global" else "Use allocation='uniform' or exclude them")
            warnings.warn(
                f"{self.config.allocation} allocation prunes every weight of {emptied}; the network may lose those layers. {remedy}",
                stacklevel=3,
            )
        return {name: budgets[name] for name in self.units}

    def finalize(self) -> nn.Module:
        """Bake the hard mask (m >= 0.5, exact count) into plain weights and remove the parametrizations.

        Kept weights keep the value the network trained with, w * m(w); pruned ones become exactly 0.
        Returns the model, now an ordinary `nn.Module` whose `state_dict` loads into the unpruned class.

        Raises:
            RuntimeError: the model is sharded with FSDP2 (use `finalized_state_dict()` instead).
        """
        self._check_attached("finalize()")
        if any(type(module).__name__.startswith("FSDP") for module, _ in self._tensors.values()):
            raise RuntimeError(
                "finalize() cannot remove parametrizations from FSDP2-sharded modules; call finalized_state_dict() "
                "on every rank and load the result into the plain architecture"
            )
        baked = self._baked()
        cleared = self._cleared(baked)
        _remove_masks(self._tensors, self._parameter_orders)
        with torch.no_grad():
            for name, (module, tensor_name) in self._tensors.items():
                getattr(module, tensor_name).copy_(baked[name])
        with torch.no_grad():
            for name, value in cleared.items():
                module_name, _, tensor_name = name.rpartition(".")
                getattr(self.model.get_submodule(module_name), tensor_name).copy_(value)
        self.finalized = True
        _ATTACHED.discard(self)
        self._load_hook.remove()
        return self.model

    def finalized_state_dict(self) -> dict[str, Tensor]:
        """The `state_dict` that `finalize()` would leave (plain keys, hard masks baked in, whole tensors),
        without touching the model: training can go on. Under FSDP2 every rank must call it."""
        self._check_attached("finalized_state_dict()")
        baked = self._baked()
        cleared = self._cleared(baked)
        names_of: dict[int, list[str]] = {}  # every name of a module, one held under two names (self.b = self.a) too
        for prefix, module in self.model.named_modules(remove_duplicate=False):
            names_of.setdefault(id(module), []).append(prefix)
        holders = {qualified_name(prefix, f"parametrizations.{tensor_name}.original"): (qualified_name(prefix, tensor_name), name)
                   for name, (module, tensor_name) in self._tensors.items() for prefix in names_of[id(module)]}
        state = {}
        for key, value in self.model.state_dict().items():
            if key in holders:
                plain, name = holders[key]
                state[plain] = cleared.get(name, baked[name])  # a fused projection's pruned heads: cleared too
            elif key in cleared:
                state[key] = cleared[key]
            elif ".parametrizations." not in key and not key.startswith("parametrizations."):
                state[key] = (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
        return state

    def _cleared(self, baked: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensor name -> its value with every group's pruned units zeroed where the group clears it (a
        pruned head's query and key rows and output columns), on top of its `_baked` value if it has one."""
        values: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, unit in self.units.items():
                if not isinstance(unit, ChannelGroup):
                    continue
                dropped = ~unit.keep_mask(self.budgets[name])  # (size,)
                for piece in unit.slices("cleared"):
                    key = qualified_name(self._name_of(piece.module), piece.tensor_name)
                    tensor = values.get(key, baked.get(key, getattr(piece.module, piece.tensor_name).detach()))
                    values[key] = tensor.index_fill(piece.dim, piece.positions[dropped].reshape(-1), 0)
        return values

    def _baked(self) -> dict[str, Tensor]:
        """Tensor name -> its finalized value (whole tensors), computed from the current weights."""
        if self.budgets is None:
            warnings.warn("finalize() during warm-up: the whole budget is pruned at once, untrained", stacklevel=3)
            self.budgets = self._allocate()
        elif self.schedule.ramp_fraction < 1.0:
            warnings.warn(
                f"finalize() at {100 * self.schedule.ramp_fraction:.0f}% of the ramp: the hard mask prunes the rest "
                "at once. Train longer or set ScheduleConfig(ramp_end_epoch=...) before the last epoch",
                stacklevel=3,
            )
        originals = self._originals()
        check_finite(originals)
        unit_names = {id(unit): name for name, unit in self.units.items()}
        baked, self.hard_cut = {}, {}
        with torch.no_grad():
            for name, (module, tensor_name) in self._tensors.items():
                value = soft = originals[name]
                for mask in module.parametrizations[tensor_name]:
                    budget = self.budgets[unit_names[id(mask.group if isinstance(mask, ChannelMask) else mask)]]
                    value, soft = mask.finalized(value, budget), mask.soft(soft, budget)
                baked[name] = value
                soft, value = in_mask_dtype(soft), in_mask_dtype(value)  # float16 squares flush to 0 or overflow
                used = float(soft.square().sum())
                self.hard_cut[name] = float((soft - value).square().sum()) / used if used > 0 else 0.0
        worst = max(self.hard_cut, key=self.hard_cut.get, default=None)
        if worst is not None and self.hard_cut[worst] > HARD_CUT_WARNING:
            batchnorm = has_batchnorm(self.model)
            if self.config.schedule.anneal_end_epoch is None:
                remedy = ("Train with ScheduleConfig(anneal_end_epoch=...) so that the soft mask turns hard before training ends"
                          + ("; for a model with BatchNorm already trained, re-estimating its statistics "
                             "(torch.optim.swa_utils.update_bn) recovers part" if batchnorm else ""))
            else:
                remedy = ("Re-estimate the BatchNorm statistics after finalize() (torch.optim.swa_utils.update_bn), which gave "
                          "the cost back on ResNet-20 at 1:4 (README)" if batchnorm else
                          "The anneal had not turned the mask hard: finalize() once it ends, or anneal further (anneal_factor)")
            warnings.warn(
                f"the hard mask removes {100 * self.hard_cut[worst]:.0f}% of the weight energy that {worst!r} computed "
                f"with (its soft mask let pruned weights contribute); expect an accuracy drop. {remedy}",
                stacklevel=3,
            )
        return baked

    def detach(self) -> nn.Module:
        """Remove the soft masks and restore the dense weights, as if the pruner had never been attached."""
        self._check_attached("detach()")
        _remove_masks(self._tensors, self._parameter_orders)
        self.finalized = True
        _ATTACHED.discard(self)
        self._load_hook.remove()
        return self.model

    def report(self) -> SparsityReport:
        """Per-tensor target (budget), current (schedule) and exact zeros; channel groups with their counts."""
        budgets = self.budgets if self.budgets is not None else self._allocate()
        rows, groups = [], []
        channel_targets: dict[str, list[float]] = {}  # producer weight -> [target, current] fractions
        for name, unit in self.units.items():
            current = None if self.finalized else unit.sparsity
            if isinstance(unit, ChannelGroup):
                groups.append(GroupSparsity(name, unit.size, unit.dead_units(), tuple(sorted(self._group_members[name])),
                                            unit.pruned(budgets[name]) / unit.size, None if current is None else unit.pruned(current) / unit.size,
                                            unit.kind))
                for piece in unit.slices("scoring"):
                    entries = piece.tensor().shape[piece.dim]
                    per_unit = piece.positions.shape[1]
                    entry = channel_targets.setdefault(f"{self._name_of(piece.module)}.{piece.tensor_name}", [0.0, 0.0])
                    entry[0] += unit.pruned(budgets[name]) * per_unit / entries
                    entry[1] += unit.pruned(unit.sparsity) * per_unit / entries
                continue
            module, attribute = self._tensors[name]
            weight = getattr(module, attribute)
            rows.append(LayerSparsity(name, unit.structure, weight.numel(), int((weight == 0).sum()), budgets[name], current))
        for name, (target, current) in channel_targets.items():
            module_name, _, tensor_name = name.rpartition(".")
            weight = getattr(self.model.get_submodule(module_name), tensor_name)
            rows.append(LayerSparsity(name, "channel", weight.numel(), int((weight == 0).sum()), target, None if self.finalized else current))
        order: dict[str, int] = {}  # module names (groups) and tensor names (rows), in the model's order
        for name, module in self.model.named_modules():
            order[name] = len(order)
            for tensor in [*module._parameters, *getattr(module, "parametrizations", {})]:
                order[qualified_name(name, tensor)] = len(order)
        rows.sort(key=lambda row: order.get(row.name, len(order)))
        groups.sort(key=lambda group: order.get(group.name, len(order)))
        return SparsityReport(tuple(rows), tuple(groups), dict(self.skipped))

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, budgets and config: numbers, strings and lists only (weights_only-safe)."""
        return {
            "format": STATE_FORMAT,
            "pdprune_version": __version__,
            "config": self.config.to_dict(),
            "schedule": self.schedule.state_dict(),
            "budgets": None if self.budgets is None else dict(self.budgets),
            "finalized": self.finalized,
            "tensors": self._shapes(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`: the next `step()` continues exactly where the saved one stopped.

        Everything is checked before anything changes: a refused state leaves the pruner as it was.

        Raises:
            ValueError: the state comes from another model, another config or another state format,
                or an entry is missing or damaged (the entry is named).
        """
        self._check_attached("load_state_dict()")
        if not isinstance(state, Mapping):
            raise ValueError(f"a pruner state is the dict that PDPPruner.state_dict() returns, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"pruner state format {state.get('format')!r} (pdprune {state.get('pdprune_version')}) is not "
                f"the format {STATE_FORMAT} of pdprune {__version__}; resume with the pdprune version that saved it"
            )
        missing = [key for key in ("tensors", "config", "schedule", "budgets", "finalized") if key not in state]
        if missing:
            raise ValueError(f"the pruner state lacks {missing}; it is damaged: save it again with PDPPruner.state_dict()")
        try:
            saved = {n: list(s) for n, s in state["tensors"].items()}
        except (AttributeError, TypeError) as error:
            raise ValueError(f"the pruner state's 'tensors' entry is damaged ({error})") from None
        ours = self._shapes()
        if saved != ours:
            missing = sorted(set(saved) - set(ours))
            extra = sorted(set(ours) - set(saved))
            reshaped = sorted(name for name in set(saved) & set(ours) if saved[name] != ours[name])
            raise ValueError(
                "the pruner state was saved for a different model: "
                f"tensors missing here {missing[:5]}, tensors not in the state {extra[:5]}, "
                f"different shapes {reshaped[:5]}. Load it into the same architecture and config"
            )
        try:
            saved_config, our_config = _plain(state["config"]), _plain(self.config.to_dict())
            saved_steps = saved_config["schedule"].pop("steps_per_epoch")
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"the pruner state's 'config' entry is damaged ({type(error).__name__}: {error})") from None
        our_steps = our_config["schedule"].pop("steps_per_epoch")
        if saved_config != our_config:
            raise ValueError(
                f"the pruner state was saved with a different config ({'; '.join(_differences(saved_config, our_config))}); "
                "create the pruner with PruningConfig.from_dict(state['config'])"
            )
        if state["finalized"]:
            raise ValueError(
                "this pruner state was saved after finalize(); load the finalized model's state_dict into the "
                "plain architecture instead of resuming the pruner"
            )
        schedule = state["schedule"]
        steps_done = schedule.get("steps_done") if isinstance(schedule, Mapping) else None
        allocated = schedule.get("allocated_epoch") if isinstance(schedule, Mapping) else None
        if isinstance(steps_done, bool) or not isinstance(steps_done, int) or steps_done < 0 or not (
            allocated is None or (isinstance(allocated, int) and not isinstance(allocated, bool))
        ):
            raise ValueError(f"the pruner state's 'schedule' entry is damaged: {schedule!r}; expected steps_done >= 0 and allocated_epoch")
        budgets = state["budgets"]
        if budgets is not None:
            bad = [name for name in self.units if not isinstance(budgets, Mapping) or not isinstance(budgets.get(name), (int, float))
                   or isinstance(budgets.get(name), bool) or not 0 <= budgets[name] <= 1]
            if bad:
                raise ValueError(f"the pruner state's budgets are missing or out of [0, 1] for {bad[:5]}; it is damaged")
        self.schedule.load_state_dict(schedule)
        if saved_steps != our_steps:  # another batch size or world size: keep the position in epochs
            self.schedule.steps_done = round(self.schedule.steps_done / saved_steps * our_steps)
        self.budgets = None if budgets is None else {name: float(budgets[name]) for name in self.units}
        self._update_sparsities()

    def reschedule(self, steps_per_epoch: int) -> None:
        """Count `steps_per_epoch` steps per epoch from now on, keeping the schedule's position in epochs
        (for when the number of optimizer steps per epoch is only known once training starts)."""
        self._check_attached("reschedule()")
        schedule = replace(self.config.schedule, steps_per_epoch=steps_per_epoch)
        self.schedule.steps_done = round(self.schedule.epoch * steps_per_epoch)
        self.config = replace(self.config, schedule=schedule)
        self.schedule.config = schedule
        self._update_sparsities()

    # --- helpers -----------------------------------------------------------------------------------

    def _original(self, name: str) -> Tensor:
        """The dense weight, whole: under FSDP2 a sharded DTensor is gathered (every rank calls this at
        the same step), so that budgets and hard masks select over the full tensor, not a shard."""
        module, tensor_name = self._tensors[name]
        original = module.parametrizations[tensor_name].original
        return original.full_tensor() if hasattr(original, "full_tensor") else original

    def _originals(self) -> dict[str, Tensor]:
        return {name: self._original(name) for name in self._tensors}

    def _shapes(self) -> dict[str, list[int]]:
        """Each pruned tensor's shape, read from the dense original: reading the parametrized attribute
        would compute the whole masked tensor."""
        return {name: list(_dense(module, tensor_name).shape) for name, (module, tensor_name) in self._tensors.items()}

    def _name_of(self, module: nn.Module) -> str:
        return next(name for name, candidate in self.model.named_modules() if candidate is module)

    def _check_attached(self, action: str) -> None:
        if self.finalized:
            raise RuntimeError(
                f"{action} after finalize()/detach(): the masks are gone from the model. "
                "Create a new PDPPruner to prune again"
            )


def _check_config(config: Any) -> None:
    """Refuse a config that is not a PruningConfig here, before the model is touched, with the way to build one."""
    if config is None or isinstance(config, PruningConfig):
        return
    if isinstance(config, Mapping):
        fix = f"build it from the dict: PDPPruner(model, PruningConfig.from_dict({dict(config)!r}))"
    elif isinstance(config, numbers.Real) and not isinstance(config, bool):
        fix = f"for a sparsity, pass PDPPruner(model, PruningConfig(sparsity={config!r}))"
    else:
        fix = "e.g. PDPPruner(model, PruningConfig(sparsity=0.9))"
    raise TypeError(f"config must be a PruningConfig or None, got {type(config).__name__} {config!r}; {fix}")


def _remove_masks(tensors: Mapping[str, tuple[nn.Module, str]], orders: list[tuple[nn.Module, list[str]]]) -> None:
    """Remove the parametrizations registered on `tensors`, putting back the dense Parameters they wrapped
    in each module's order from before (`orders`), so that `state_dict()` lists its keys as it did."""
    masked: dict[int, list[str]] = {}  # module -> its masked tensors
    for module, tensor_name in tensors.values():
        masked.setdefault(id(module), []).append(tensor_name)
    for module, order in orders:
        if parametrize.is_parametrized(module):
            remove_masks(module, masked.get(id(module), []))
        for name in order:
            if name in module._parameters:
                module._parameters[name] = module._parameters.pop(name)  # to the end, in the old order


def _dense(module: nn.Module, tensor_name: str) -> Tensor:
    """The tensor under the mask (the module's own one once the mask is gone)."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


def _write(buffers: list[Tensor], values: Tensor) -> None:
    """buffers[i] <- values[i] for 0-dim buffers of one dtype and device, in one operation."""
    torch._foreach_copy_(buffers, list(values.to(buffers[0].dtype).unbind()))


def _differences(saved: Mapping[str, Any], ours: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'field: saved value saved, our value here' for every field that differs, nested ones as 'schedule.field'."""
    found = []
    for key in sorted(saved.keys() | ours.keys()):
        old, new = saved.get(key), ours.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {old!r} saved, {new!r} here")
    return found


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: a config compares equal after a trip through JSON."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
