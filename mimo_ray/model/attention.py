"""Core attention that calls PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU,
also runs on CPU), a drop-in for Megatron's ``DotProductAttention`` in a layer spec.

Megatron's local attention materialises the full ``[b, np, sq, sk]`` score tensor through a CUDA-only global
buffer; measured 3.3x slower on an H100 for our fused step (NOTES.md §5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Scaled dot-product attention over Megatron's ``[s, b, heads, head_dim]`` layout.

    Args:
        config: the transformer config (heads, query groups, dropout).
        layer_number: 1-based layer index (unused; kept for spec compatibility).
        attn_mask_type: ``causal`` (language model) or ``no_mask`` / ``padding`` (encoders).
        attention_type: ``self`` or ``cross`` (unused).
        attention_dropout: overrides ``config.attention_dropout``.
        softmax_scale: overrides ``1/sqrt(head_dim)``.
        cp_comm_type: context parallelism is not supported (must be ``None`` or ``p2p`` with CP size 1).
        pg_collection: process groups; the tensor-parallel group sets the local head count.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,  # noqa: ANN001
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the 'te' attention backend")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        head_dim = divide(config.kv_channels * config.num_attention_heads, config.num_attention_heads)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,  # noqa: ANN001
    ) -> torch.Tensor:
        """Attend.

        Args:
            query: ``[sq, b, np, hn]``.
            key: ``[sk, b, ng, hn]``.
            value: ``[sk, b, ng, hn]``.
            attention_mask: Megatron convention, ``True`` = masked out; broadcastable to ``[b, np, sq, sk]``.
            attn_mask_type: overrides the layer's mask type for this call.
            attention_bias: unsupported (must be ``None``).
            packed_seq_params: unsupported (must be ``None``).

        Returns:
            Context ``[sq, b, np * hn]``.
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention supports neither attention_bias nor packed sequences")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.num_groups != self.num_heads:
            rep = self.num_heads // self.num_groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        is_causal = False
        sdpa_mask = None
        if attention_mask is not None:
            sdpa_mask = ~attention_mask.bool()
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:
                # Query i sits at absolute position sk - sq + i (KV-cache prefill on top of a prefix).
                offset = sk - sq
                rows = torch.arange(sq, device=q.device).unsqueeze(1) + offset
                sdpa_mask = torch.arange(sk, device=q.device).unsqueeze(0) <= rows
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=sdpa_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
        )
        # [b, n, sq, d] -> [sq, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
