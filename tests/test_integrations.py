"""Lightning and Hugging Face callbacks: attach, step, log, checkpoint, resume, finalize."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pdprune import PruningConfig, ScheduleConfig, is_nm_sparse


def _quiet_lightning():
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _lightning_classifier(width: int, momentum: float) -> type:
    """A LightningModule class: an MLP 16-width-4 trained with SGD (Lightning is imported only when used)."""
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))

        def training_step(self, batch, batch_index):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=momentum)

    return Classifier


def test_lightning_callback_prunes_logs_checkpoints_and_resumes(tmp_path):
    import lightning as L

    from pdprune.integrations.lightning import PDPCallback

    _quiet_lightning()
    Classifier = _lightning_classifier(width=64, momentum=0.9)

    generator = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(128, 16, generator=generator), torch.randint(0, 4, (128,), generator=generator)), batch_size=16)
    config = PruningConfig(sparsity=0.8, allocation="uniform", schedule=ScheduleConfig(warmup_epochs=1, ramp_end_epoch=3))

    def trainer(callback, checkpoints=None):
        extra = [] if checkpoints is None else [L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoints, every_n_epochs=1, save_top_k=-1)]
        return L.Trainer(max_epochs=4, callbacks=[callback, *extra], logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=checkpoints is not None,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", deterministic=True, log_every_n_steps=1)

    torch.manual_seed(0)
    straight_model, straight = Classifier(), PDPCallback(config)
    trainer(straight, checkpoints=tmp_path / "checkpoints").fit(straight_model, data)
    assert straight.pruner.finalized
    weights = [m.weight for m in straight_model.net if isinstance(m, torch.nn.Linear)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))
    assert any("pdprune/sparsity/net.0.weight" in path.read_text() for path in (tmp_path / "lightning_logs").rglob("metrics.csv"))

    # A checkpoint written mid-training (after epoch 2 of 4) holds the pruner; resuming from it ends the same.
    middle = next((tmp_path / "checkpoints").glob("epoch=1-*.ckpt"))
    checkpoint = torch.load(middle, weights_only=False)
    saved = next(value for key, value in checkpoint["callbacks"].items() if "PDPCallback" in key)
    assert saved["schedule"]["steps_done"] == 16 and saved["budgets"] is not None
    resumed_model, resumed = Classifier(), PDPCallback(config)
    trainer(resumed).fit(resumed_model, data, ckpt_path=middle)
    assert resumed.pruner.finalized and resumed.pruner.budgets == straight.pruner.budgets
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_transformers_callback_on_a_small_bert(tmp_path, structure):
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from pdprune.integrations.transformers import STATE_KEY, PDPTrainerCallback

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)

    class Examples(torch.utils.data.Dataset):
        def __init__(self) -> None:
            generator = torch.Generator().manual_seed(1)
            self.ids = torch.randint(1, 100, (64, 16), generator=generator)
            self.labels = (self.ids[:, 0] > 50).long()

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, index: int) -> dict:
            return {"input_ids": self.ids[index], "labels": self.labels[index]}

    def run(steps: int, resume: bool = False):
        torch.manual_seed(0)
        model = BertForSequenceClassification(bert)
        config = PruningConfig(sparsity=0.75, structure=structure, module_types=("Linear",), exclude=("classifier",),
                               schedule=ScheduleConfig(warmup_epochs=1, ramp_end_epoch=2))
        callback = PDPTrainerCallback(model, config)
        arguments = TrainingArguments(output_dir=str(tmp_path / ("resumed" if resume else "out")), per_device_train_batch_size=16,
                                      num_train_epochs=4, max_steps=steps,
                                      save_steps=8, save_strategy="steps", logging_steps=4, report_to=[], learning_rate=1e-3,
                                      use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
        trainer = Trainer(model=model, args=arguments, train_dataset=Examples(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-8") if resume else None)
        return model, callback

    model, callback = run(16)
    assert callback.pruner.finalized and callback.pruner.schedule.config.steps_per_epoch == 4
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier"}
    if structure == "2:4":
        assert all(is_nm_sparse(m.weight, 2, 4) for m in linears.values())
    else:
        total = sum(m.weight.numel() for m in linears.values())
        assert sum(int((m.weight == 0).sum()) for m in linears.values()) == round(0.75 * total)
    state = json.loads((tmp_path / "out" / "checkpoint-8" / "trainer_state.json").read_text())["stateful_callbacks"][STATE_KEY]
    assert state["schedule"]["steps_done"] == 8

    resumed_model, resumed = run(16, resume=True)  # into another output_dir: the state comes from the checkpoint resumed from
    assert resumed.pruner.finalized and resumed.pruner.budgets == callback.pruner.budgets
    for name, module in linears.items():
        torch.testing.assert_close(dict(resumed_model.named_modules())[name].weight, module.weight, rtol=1e-4, atol=1e-5)


class _PlainClassifier(torch.nn.Module):
    """Not a PreTrainedModel: the Trainer saves its checkpoints with safetensors' save_file."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.hidden, self.head = torch.nn.Embedding(64, 16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(torch.relu(self.hidden(self.embed(input_ids).mean(dim=1))))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("architecture, structure", [("gpt2", "unstructured"), ("bert", "channel"), ("plain", "channel")])
def test_transformers_checkpoints_take_tensors_the_masks_share(tmp_path, architecture, structure):
    """A tied embedding's weight (GPT-2's wte and lm_head) is one tensor under several names once masked,
    and a channel group gates several tensors; the Trainer's safetensors checkpoints must take them
    (save_pretrained, or save_file for a plain module), and training resumed from one must end where
    the uninterrupted run ends."""
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from pdprune.integrations.transformers import PDPTrainerCallback

    transformers.logging.set_verbosity_error()
    ids = torch.randint(1, 64, (32, 8), generator=torch.Generator().manual_seed(1))
    labels = ids if architecture == "gpt2" else (ids[:, 0] > 32).long()
    examples = [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]

    def run(resume: bool):
        torch.manual_seed(0)
        if architecture == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=64))
            example = None
        elif architecture == "bert":
            model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=64, max_position_embeddings=16))
            example = {"input_ids": ids[:2]}
        else:
            model, example = _PlainClassifier(), {"input_ids": ids[:2], "labels": labels[:2]}
        config = PruningConfig(sparsity=0.5, structure=structure, schedule=ScheduleConfig(warmup_epochs=1, ramp_end_epoch=3))
        callback = PDPTrainerCallback(model, config, example_inputs=example)
        arguments = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=4, save_strategy="epoch",
                                      report_to=[], learning_rate=1e-3, use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
        Trainer(model=model, args=arguments, train_dataset=examples, callbacks=[callback]).train(
            resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-8") if resume else None)
        return model

    straight, resumed = run(resume=False), run(resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    pruned = {"gpt2": "lm_head.weight", "bert": "bert.encoder.layer.0.intermediate.dense.weight", "plain": "hidden.weight"}[architecture]
    assert float((straight.state_dict()[pruned] == 0).float().mean()) >= 0.4


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(1, 64, (8,), generator=generator)
            yield {"input_ids": ids, "labels": (ids[0] > 32).long()}


def test_transformers_callback_counts_steps_as_the_trainer_does_and_a_second_train_fine_tunes(tmp_path):
    """10 examples in batches of 2, gradients accumulated over 2: 5 batches, 3 optimizer steps per epoch
    (the last one on a single batch). A second train() fine-tunes the pruned model; a stream has no
    length, so steps_per_epoch must be given."""
    import transformers
    from transformers import Trainer, TrainingArguments

    from pdprune.integrations.transformers import PDPTrainerCallback

    transformers.logging.set_verbosity_error()
    ids = torch.randint(1, 64, (10, 8), generator=torch.Generator().manual_seed(1))
    examples = [{"input_ids": row, "labels": (row[0] > 32).long()} for row in ids]
    torch.manual_seed(0)
    model = _PlainClassifier()
    callback = PDPTrainerCallback(model, PruningConfig(sparsity=0.5, allocation="uniform", schedule=ScheduleConfig(warmup_epochs=1, ramp_end_epoch=2)))
    arguments = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                  num_train_epochs=3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=arguments, train_dataset=examples, callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 9 and callback.pruner.schedule.config.steps_per_epoch == 3
    assert callback.pruner.finalized and int((model.hidden.weight == 0).sum()) == 256
    trainer.train()
    assert int((model.hidden.weight == 0).sum()) < 256, "fine-tuned as a plain model"

    stream = PDPTrainerCallback(_PlainClassifier(), PruningConfig(sparsity=0.5))
    arguments = TrainingArguments(output_dir=str(tmp_path / "stream"), per_device_train_batch_size=2, max_steps=2,
                                  save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    with pytest.raises(ValueError, match=r"no length \(a streaming dataset\).*steps_per_epoch"):
        Trainer(model=stream.model, args=arguments, train_dataset=_Stream(), callbacks=[stream]).train()


def test_lightning_callback_counts_an_epoch_s_optimizer_steps_and_keeps_steps_per_epoch_it_is_given(tmp_path):
    """5 batches, gradients accumulated over 2: 3 optimizer steps per epoch, whatever max_steps cuts."""
    import lightning as L

    from pdprune.integrations.lightning import PDPCallback

    _quiet_lightning()
    Classifier = _lightning_classifier(width=32, momentum=0.0)

    generator = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(80, 16, generator=generator), torch.randint(0, 4, (80,), generator=generator)), batch_size=16)
    for given, expected in ((1, 3), (5, 5)):
        callback = PDPCallback(PruningConfig(sparsity=0.5, schedule=ScheduleConfig(warmup_epochs=1, ramp_end_epoch=2, steps_per_epoch=given)))
        L.Trainer(max_epochs=4, max_steps=6, accumulate_grad_batches=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path).fit(Classifier(), data)
        assert callback.pruner.schedule.config.steps_per_epoch == expected
