"""One decoder-only transformer for Llama 2/3, Mistral, Qwen2 and Qwen3.

The families differ only by flags of ``ModelConfig``: q/k/v bias (Qwen2),
per-head q/k RMSNorm (Qwen3), head_dim, tied embeddings. q/k/v and gate/up
projections are fused; ``hf_weight_map`` says where each HF tensor goes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.attention import AttentionMetadata, get_attention_backend
from services.engine.config import ModelConfig
from services.engine.kv_cache import KVCache
from services.engine.models.layers import (
    Embedding,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    silu_and_mul,
)


class Attention(nn.Module):
    def __init__(self, mc: ModelConfig, layer_idx: int, backend: object) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = mc.num_heads, mc.num_kv_heads
        self.head_dim = mc.head_dim
        self.q_size = mc.num_heads * mc.head_dim
        self.kv_size = mc.num_kv_heads * mc.head_dim
        self.qkv_proj = Linear(mc.hidden_size, self.q_size + 2 * self.kv_size, bias=mc.qkv_bias)
        self.o_proj = Linear(self.q_size, mc.hidden_size, bias=mc.o_bias)
        self.qk_norm = mc.qk_norm
        if mc.qk_norm:
            self.q_norm = RMSNorm(mc.head_dim, mc.rms_norm_eps)
            self.k_norm = RMSNorm(mc.head_dim, mc.rms_norm_eps)
        self.attn = backend

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # per head: rows of head_dim
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(t, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(t, self.num_kv_heads, self.head_dim)
        q, k = rope(positions, q, k)
        k_cache, v_cache = kv_cache.layer(self.layer_idx)
        o = self.attn.forward(q, k, v, k_cache, v_cache, meta)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, mc: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(mc.hidden_size, 2 * mc.intermediate_size, bias=mc.mlp_bias)
        self.down_proj = Linear(mc.intermediate_size, mc.hidden_size, bias=mc.mlp_bias)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.fused))


class DecoderLayer(nn.Module):
    def __init__(self, mc: ModelConfig, layer_idx: int, backend: object) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)
        self.self_attn = Attention(mc, layer_idx, backend)
        self.post_attention_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)
        self.mlp = MLP(mc)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added): the add is
        fused into the next norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, mc: ModelConfig, backend: object) -> None:
        super().__init__()
        self.embed_tokens = Embedding(mc.vocab_size, mc.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(mc, i, backend) for i in range(mc.num_layers))
        self.norm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    def __init__(
        self, mc: ModelConfig, max_len: int, attention_backend: str, device: torch.device
    ) -> None:
        super().__init__()
        self.config = mc
        backend = get_attention_backend(attention_backend)(
            mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.head_dim**-0.5
        )
        self.attention_backend = backend
        self.model = DecoderModel(mc, backend)
        self.lm_head = None if mc.tie_word_embeddings else Linear(mc.hidden_size, mc.vocab_size)
        self.rope = RotaryEmbedding(mc, max_len, device)
        fused = backend.name == "triton"  # the Triton elementwise kernels come with it
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = fused

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, self.rope, kv_cache, meta)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    def hf_weight_map(self) -> dict[str, tuple[str, int, int]]:
        """HF tensor name -> (our parameter name, first row, number of rows)."""
        mc = self.config
        q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        inter = mc.intermediate_size
        packed = {
            "self_attn.qkv_proj": [("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)],
            "mlp.gate_up_proj": [("gate_proj", 0, inter), ("up_proj", inter, inter)],
        }
        out: dict[str, tuple[str, int, int]] = {}
        for name, p in self.named_parameters():
            prefix, _, leaf = name.rpartition(".")  # e.g. "model.layers.0.mlp.gate_up_proj"
            key = next((k for k in packed if prefix.endswith(k)), None)
            if key is None:
                out[name] = (name, 0, p.shape[0])
                continue
            base = prefix[: -len(key)] + key.split(".")[0]  # "model.layers.0.mlp"
            for hf_module, start, n in packed[key]:
                out[f"{base}.{hf_module}.{leaf}"] = (name, start, n)
        return out
