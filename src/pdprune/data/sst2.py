"""SST-2 (GLUE): binary sentiment of movie-review sentences, with a word tokenizer of our own.

GLUE's test labels are not public, so `dev.tsv` (872 sentences) is the evaluation set.
"""

from __future__ import annotations

import csv
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from pdprune.data.dataset import Dataset
from pdprune.data.files import DataError, verified
from pdprune.data.files import download as fetch

__all__ = ["load_sst2", "WordTokenizer", "URL"]

URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
MAX_LENGTH = 64


class WordTokenizer:
    """Lower-cased whitespace words (SST-2 is already tokenized) -> ids; 0 pads, 1 is unknown."""

    PAD, UNKNOWN = 0, 1

    def __init__(self, vocabulary: list[str]) -> None:
        self.vocabulary = vocabulary
        self.index = {word: position for position, word in enumerate(vocabulary)}

    @classmethod
    def fit(cls, sentences: Iterable[str], min_count: int = 1) -> WordTokenizer:
        """Vocabulary of the training sentences, most frequent first (ties alphabetical): deterministic."""
        counts = Counter(word for sentence in sentences for word in sentence.lower().split())
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(["<pad>", "<unk>", *words])

    def encode(self, sentences: list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
        """(len(sentences), max_length) ids, truncated and right-padded with 0."""
        ids = torch.zeros(len(sentences), max_length, dtype=torch.long)
        for row, sentence in enumerate(sentences):
            tokens = [self.index.get(word, self.UNKNOWN) for word in sentence.lower().split()][:max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids


def _read(path: Path) -> tuple[list[str], torch.Tensor]:
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    try:
        return [row["sentence"] for row in rows], torch.tensor([int(row["label"]) for row in rows])
    except (KeyError, ValueError, TypeError) as error:
        raise DataError(f"{path} is not a GLUE SST-2 file with 'sentence' and 'label' columns ({error})") from error


def load_sst2(directory: Path, download: bool = False) -> Dataset:
    """67,349 training sentences, 872 dev sentences, as (n, 64) token ids, with the vocabulary."""
    directory = Path(directory)
    if download and not all((directory / f"sst2/{name}.tsv").is_file() for name in ("train", "dev")):
        archive = fetch([URL], directory, "sst2/SST-2.zip", check=False)  # the TSVs inside are checked
        with zipfile.ZipFile(archive) as zipped:
            for name in ("train", "dev", "test"):
                (directory / f"sst2/{name}.tsv").write_bytes(zipped.read(f"SST-2/{name}.tsv"))
        archive.unlink()
    train_sentences, train_labels = _read(verified(directory, "sst2/train.tsv"))
    dev_sentences, dev_labels = _read(verified(directory, "sst2/dev.tsv"))
    tokenizer = WordTokenizer.fit(train_sentences)
    return Dataset("sst2", tokenizer.encode(train_sentences), train_labels, {"dev": (tokenizer.encode(dev_sentences), dev_labels)},
                   num_classes=2, vocabulary=tuple(tokenizer.vocabulary))
