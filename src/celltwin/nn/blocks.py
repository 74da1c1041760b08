"""Llama-style transformer pieces and MLPs (nanoGPT-like, shapes in comments).

Conventions: ``B`` batch of sets, ``S`` set length (tokens), ``H`` hidden size,
``nh`` heads, ``hd`` head dim. No positional encoding anywhere: the blocks are
permutation equivariant over the token axis, which the ST model relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "Attention", "LlamaBlock", "LlamaEncoder", "RMSNorm", "SwiGLU"]


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x**2) + eps) * weight`` (no bias, no centring).

    The statistic is computed in float32 even under bf16/fp16 autocast (precision choice:
    the mean of squares of 700 bf16 values loses ~3 significant bits otherwise), then cast
    back to the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """Llama MLP: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B, S, H)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """Bidirectional multi-head self-attention via ``F.scaled_dot_product_attention``.

    ``key_padding_mask`` (B, S) bool, True = a real token; padded keys get no attention.
    No causal mask, no rotary/positional terms: the output for token i depends on the
    other tokens only as a set.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            msg = f"hidden size {dim} is not divisible by n_heads {n_heads}"
            raise ValueError(msg)
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = self.qkv(x).split(H, dim=-1)  # 3 x (B, S, H)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = k.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, S) broadcast over heads/queries
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=False
        )  # (B, nh, S, hd)
        y = y.transpose(1, 2).reshape(B, S, H)
        return self.out(y)


class LlamaBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, n_heads: int, mlp_hidden: int, eps: float = 1e-6, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, dropout)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), key_padding_mask))  # (B, S, H)
        return x + self.drop(self.mlp(self.mlp_norm(x)))  # (B, S, H)


class LlamaEncoder(nn.Module):
    """A stack of :class:`LlamaBlock` followed by a final RMSNorm."""

    def __init__(
        self, dim: int, n_layers: int, n_heads: int, mlp_hidden: int, eps: float = 1e-6, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LlamaBlock(dim, n_heads, mlp_hidden, eps, dropout) for _ in range(n_layers))
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, key_padding_mask)  # (B, S, H)
        return self.norm(x)


class MLP(nn.Module):
    """``n_layers`` Linear layers with GELU (and optional dropout) between them; the last is linear.

    ``n_layers=1`` is a single Linear map. Used as the control-set / perturbation encoders
    (4 layers in the published ST) and as decoders to gene space.
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int, n_layers: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if n_layers < 1:
            msg = f"MLP needs n_layers >= 1, got {n_layers}"
            raise ValueError(msg)
        dims = [d_in] + [d_hidden] * (n_layers - 1) + [d_out]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        return self.net(x)
