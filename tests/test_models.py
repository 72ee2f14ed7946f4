from __future__ import annotations

import glob

import pytest
import torch
from torch import nn

from pdprune.models import MODELS, build_model, load_pretrained

SHAPES = {"mlp": (1, 8, 8), "lenet5": (1, 28, 28), "transformer": (16,)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_trains_one_step(name):
    shape = SHAPES.get(name, (3, 32, 32))
    model = build_model(name, shape, 10, vocabulary_size=50)
    x = torch.randint(1, 50, (4, *shape)) if name == "transformer" else torch.randn(4, *shape)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert model(x).shape == (4, 10)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_resnet_cifar_has_the_published_parameter_count():
    assert sum(p.numel() for p in build_model("resnet20", (3, 32, 32), 10).parameters()) == 269_722


def test_pretrained_resnet20_scores_its_published_accuracy(data_dir):
    from pdprune.data import load_dataset
    from pdprune.train import evaluate

    model = load_pretrained(build_model("resnet20", (3, 32, 32), 10), glob.glob(str(data_dir / "resnet_cifar10_akamaster/resnet20-*.th"))[0])
    accuracy = evaluate(model, *load_dataset("cifar10", data_dir).evaluations["test_exact_0_999"])
    assert accuracy >= 0.90, accuracy
    assert accuracy == pytest.approx(0.915, abs=0.002)


def test_pretrained_weights_of_another_architecture_are_refused(data_dir):
    path = glob.glob(str(data_dir / "resnet_cifar10_akamaster/resnet20-*.th"))[0]
    with pytest.raises(ValueError, match=r"does not fit ResNetCifar: missing \['layer1.3"):
        load_pretrained(build_model("resnet32", (3, 32, 32), 10), path)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'; choose one of \['lenet5', "):
        build_model("resnet18", (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"pass vocabulary_size="):
        build_model("transformer", (16,), 2)
