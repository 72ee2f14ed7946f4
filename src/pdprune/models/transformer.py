"""A small BERT-style encoder for text classification, with every projection a plain nn.Linear.

Attention is written out (query, key, value and output projections as separate Linear layers, as in
BERT) so that unstructured, N:M and channel pruning see every weight matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TransformerClassifier", "EncoderLayer"]


class EncoderLayer(nn.Module):
    """Post-norm BERT layer: x + attention(x) -> LayerNorm -> x + feed-forward(x) -> LayerNorm."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.output = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.norm2 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        batch, length, width = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(batch, length, self.heads, width // self.heads).transpose(1, 2)  # (batch, heads, length, width/heads)

        mask = None if padding is None else ~padding[:, None, None, :]  # (batch, 1, 1, length): True where attended
        attended = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask,
                                                  dropout_p=self.dropout.p if self.training else 0.0)
        x = self.norm1(x + self.dropout(self.output(attended.transpose(1, 2).reshape(batch, length, width))))
        return self.norm2(x + self.dropout(self.down(F.gelu(self.up(x)))))


class TransformerClassifier(nn.Module):
    """Token + position embeddings -> encoder layers -> mean over non-padding tokens -> linear."""

    def __init__(self, vocabulary_size: int, num_classes: int, max_length: int = 64, width: int = 128,
                 layers: int = 2, heads: int = 4, hidden: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocabulary_size, width, padding_idx=0)
        self.positions = nn.Embedding(max_length, width)
        self.layers = nn.ModuleList(EncoderLayer(width, heads, hidden, dropout) for _ in range(layers))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        padding = ids == 0  # (batch, length)
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x, padding)
        keep = (~padding).unsqueeze(-1).to(x.dtype)  # (batch, length, 1)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)  # (batch, width)
        return self.classifier(pooled)
