"""Torch building blocks shared by the celltwin models (ST, SE).

Everything here is a plain :class:`torch.nn.Module` with no hidden state beyond its
parameters: RMSNorm, a Llama-style pre-norm transformer block (bidirectional attention
through ``torch.nn.functional.scaled_dot_product_attention``, SwiGLU MLP, no biases) and
a plain GELU MLP used as an encoder/decoder.
"""

from __future__ import annotations

from celltwin.nn.blocks import MLP, Attention, LlamaBlock, LlamaEncoder, RMSNorm, SwiGLU

__all__ = ["MLP", "Attention", "LlamaBlock", "LlamaEncoder", "RMSNorm", "SwiGLU"]
