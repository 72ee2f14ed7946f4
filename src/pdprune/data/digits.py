"""scikit-learn's bundled handwritten digits (UCI optdigits test set): 1,797 8x8 images, no download."""

from __future__ import annotations

import torch

from pdprune.data.dataset import Dataset

__all__ = ["load_digits"]

TEST_FRACTION = 0.2


def load_digits(seed: int = 0) -> Dataset:
    """1,438 training and 359 test images (a fixed seeded split), pixels scaled to [0, 1], shape (1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError("the digits dataset ships with scikit-learn: pip install 'pdprune[data]'") from error
    digits = sklearn_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test_size = int(round(TEST_FRACTION * len(labels)))
    test, train = order[:test_size], order[test_size:]
    return Dataset("digits", inputs[train], labels[train], {"test": (inputs[test], labels[test])}, num_classes=10)
