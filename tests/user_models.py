"""A user's own model package, as `compress` sees it through `package.module:factory`."""

from __future__ import annotations

import torch
from torch import nn


class UserNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=1).relu()
        return self.head(y.mean(dim=(2, 3)))


def make(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return UserNet(num_classes)


class NotExportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Data-dependent Python control flow on a tensor value: the exporter cannot follow it.
        if float(x.sum()) > 0:
            return self.fc(x.flatten(1))
        return self.fc(x.flatten(1)).neg()


def not_exportable() -> nn.Module:
    return NotExportable()


class Embedder(nn.Module):
    """A sentence-embedding-like model: a 32-wide, L2-normalised vector per sample (not class scores)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 48)
        self.fc2 = nn.Linear(48, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.fc2(self.fc1(x.flatten(1)).relu()), dim=1)


def embedder() -> nn.Module:
    torch.manual_seed(0)
    return Embedder()


class Constant(nn.Module):
    """A model whose output ignores its input (as a zero-initialised head does): fidelity would pass vacuously."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        with torch.no_grad():
            self.fc.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def constant() -> nn.Module:
    torch.manual_seed(0)
    return Constant()


def recall_at_1(ref, got, labels):  # type: ignore[no-untyped-def]
    """A task metric as a user writes it: retrieval recall@1 of `got` embeddings against `ref` ones."""
    import numpy as np

    sims = got @ ref.T
    return {"recall@1": float((sims.argmax(1) == np.arange(len(ref))).mean())}


class HFSelfAttention(nn.Module):
    """Attention written the Hugging Face way: num_attention_heads, and a reshape with a fixed head size."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = d // heads
        self.all_head_size = d
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.attention_head_size)
        q, k, v = (m(x).view(shape).transpose(1, 2) for m in (self.query, self.key, self.value))
        att = (q @ k.transpose(-1, -2) * self.attention_head_size ** -0.5).softmax(-1)
        return (att @ v).transpose(1, 2).reshape(*x.shape[:-1], -1)


class HFLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.attention = HFSelfAttention(d, heads)
        self.attention_out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d)
        self.intermediate = nn.Linear(d, ff)
        self.output = nn.Linear(ff, d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention_out(self.attention(x)))
        return self.norm2(x + self.output(torch.nn.functional.gelu(self.intermediate(x))))


class HFStyleEncoder(nn.Module):
    """An encoder whose output is its hidden states (batch, tokens, 32), as BERT's last_hidden_state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.layers = nn.ModuleList([HFLayer(32, 4, 64) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return h


def hf_style_encoder() -> nn.Module:
    torch.manual_seed(0)
    return HFStyleEncoder()


class MaskedEncoder(nn.Module):
    """A BERT-shaped sentence encoder: token ids and a 0/1 attention mask in, a mean-pooled embedding out."""

    def __init__(self, vocab: int = 100) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, 32)
        self.layers = nn.ModuleList([HFLayer(32, 4, 64) for _ in range(2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.tokens(input_ids)
        # The Hugging Face extended mask: 0 where attended, a large negative bias where padded.
        bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.layers:
            a = layer.attention
            shape = (*h.shape[:-1], -1, a.attention_head_size)
            q, k, v = (m(h).view(shape).transpose(1, 2) for m in (a.query, a.key, a.value))
            att = (q @ k.transpose(-1, -2) * a.attention_head_size ** -0.5 + bias).softmax(-1)
            ctx = (att @ v).transpose(1, 2).reshape(*h.shape[:-1], -1)
            h = layer.norm1(h + layer.attention_out(ctx))
            h = layer.norm2(h + layer.output(torch.nn.functional.gelu(layer.intermediate(h))))
        m = attention_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def masked_encoder() -> nn.Module:
    torch.manual_seed(0)
    return MaskedEncoder()


class BiasedAttention(HFSelfAttention):
    """Attention with a learned bias per head (as Swin's relative position bias): heads cannot simply go."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__(d, heads)
        self.head_bias = nn.Parameter(torch.zeros(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], -1, self.attention_head_size)
        q, k, v = (m(x).view(shape).transpose(1, 2) for m in (self.query, self.key, self.value))
        att = (q @ k.transpose(-1, -2) + self.head_bias[:, None, None]).softmax(-1)
        return (att @ v).transpose(1, 2).reshape(*x.shape[:-1], -1)


def biased_encoder() -> nn.Module:
    torch.manual_seed(0)
    m = HFStyleEncoder()
    for layer in m.layers:
        layer.attention = BiasedAttention(32, 4)
    return m
