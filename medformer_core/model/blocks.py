"""Transformer blocks on token sequences [B, N, E]; every attention goes through `medformer_kernels`.

Tokens carry no spatial layout, so one block serves 2D and 3D inputs alike.
"""

import torch
import torch.nn.functional as F
from torch import nn

import medformer_kernels as kernels


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x: [B, N, E] -> [B, H, N, E / H]."""
    b, n, e = x.shape
    return x.reshape(b, n, heads, e // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, d] -> [B, N, H * d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention: x [B, N, E] -> [B, N, E]."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(kernels.attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries [B, Q, E] attend to context [B, N, E] -> [B, Q, E].

    Keys come from `context`, values from `values` (default: `context`), both [B, N, E].
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        q = split_heads(self.q(queries), self.heads)
        if values is None:
            k, v = (split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))
        else:  # the key and value halves of the kv projection, each on its own input
            w_k, w_v = self.kv.weight.chunk(2)
            b_k, b_v = self.kv.bias.chunk(2) if self.kv.bias is not None else (None, None)
            k = split_heads(F.linear(context, w_k, b_k), self.heads)
            v = split_heads(F.linear(values, w_v, b_v), self.heads)
        return self.proj(merge_heads(kernels.attention(q, k, v)))


class Mlp(nn.Sequential):
    """x [B, N, E] -> Linear -> GELU -> Linear -> [B, N, E]."""

    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class DropPath(nn.Module):
    """Stochastic depth: in training, drops a residual branch per sample with probability `p`.

    Draws from torch's global generator (seed it with torch.manual_seed for a reproducible run).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); x: [B, N, E]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: queries [B, Q, E] read context [B, N, E] -> [B, Q, E].

    With `raw_values=True` only the keys see the normalised context; the values are the context
    as it is, so a token's size counts: the Input Adaptformer reads what an image holds (its
    tokens of tissue are large, its empty tokens small) instead of an average in which every token,
    empty or not, weighs the same after the LayerNorm (docs/model.md, "Features that separate
    images").
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0, qkv_bias: bool = True,
                 raw_values: bool = False):
        super().__init__()
        self.raw_values = raw_values
        self.norm_q = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        values = context if self.raw_values else None
        x = queries + self.drop_path(self.attn(self.norm_q(queries), self.norm_context(context), values))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
