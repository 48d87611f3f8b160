"""Self-attention for the decoder: grouped-query attention (with the families' variants) and DeepSeek's
multi-head latent attention, both reading and writing the preallocated KV cache.

GQA variants: q/k/v bias, o bias, q/k RMSNorm per head (Qwen3) or over the full projection (OLMoE,
normalised before the head split), clip_qkv (OLMoE), sliding window. MLA: optional q LoRA, latent
kv_a projection whose normalised latent and rotary key are cached; keys/values are expanded from the
latent with kv_b_proj for every cached position, the same computation as transformers.

Dimensions: T new tokens, S cached positions (start + T), D hidden, H heads, KV kv heads, hd head dim,
C kv LoRA rank, R rotary dims, N qk non-rotary dims, Vd value head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeinf.models.layers import Linear, RMSNorm
from moeinf.models.rope import RotaryTable
from moeinf.models.spec import ModelSpec
from moeinf.runtime.kv_cache import GQALayerCache, MLALayerCache

LORA_NORM_EPS = 1e-6  # DeepSeek's q_a/kv_a norms use RMSNorm's default eps, not rms_norm_eps


def causal_mask(start_pos: int, t: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [T, S] mask (True = attend) for queries at start_pos.. over keys 0..start_pos+T-1.

    None when every query may see every cached key (one token, no window binding).
    """
    s = start_pos + t
    if t == 1 and (window is None or s <= window):
        return None
    q_pos = torch.arange(start_pos, s, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(s, device=device)[None, :]  # [1, S]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    return mask


class GQAAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        a = spec.attention
        d, q_dim, kv_dim = spec.hidden_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.heads, self.kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_proj = Linear(d, q_dim, bias=a.qkv_bias)
        self.k_proj = Linear(d, kv_dim, bias=a.qkv_bias)
        self.v_proj = Linear(d, kv_dim, bias=a.qkv_bias)
        self.o_proj = Linear(q_dim, d, bias=a.o_bias)
        self.qk_norm = a.qk_norm
        if a.qk_norm != "none":
            per_head = a.qk_norm == "per_head"
            self.q_norm = RMSNorm(a.head_dim if per_head else q_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim if per_head else kv_dim, spec.rms_norm_eps)
        self.clip = a.clip_qkv
        self.scale = a.softmax_scale
        self.window = a.sliding_window if layer in a.sliding_layers else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTable,
        start_pos: int,
        cache: GQALayerCache,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, H*hd], [T, KV*hd] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.view(t, self.heads, self.head_dim)  # [T, H, hd]
        k = k.view(t, self.kv_heads, self.head_dim)  # [T, KV, hd]
        v = v.view(t, self.kv_heads, self.head_dim)  # [T, KV, hd]
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary.apply(q, k, start_pos)
        end = start_pos + t
        cache.keys[:, start_pos:end] = k.transpose(0, 1)
        cache.values[:, start_pos:end] = v.transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, T, hd]
            cache.keys[:, :end].unsqueeze(0),  # [1, KV, S, hd]
            cache.values[:, :end].unsqueeze(0),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.heads != self.kv_heads,
        )  # [1, H, T, hd]
        return self.o_proj(out[0].transpose(0, 1).reshape(t, self.heads * self.head_dim))


class MLAAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        a = spec.attention
        d, h = spec.hidden_size, a.num_heads
        self.heads, self.nope, self.rope, self.v_dim, self.rank = (
            h,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
            a.kv_lora_rank,
        )
        qk = a.qk_head_dim
        if a.q_lora_rank is None:
            self.q_proj = Linear(d, h * qk, bias=False)
        else:
            self.q_a_proj = Linear(d, a.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(a.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = Linear(a.q_lora_rank, h * qk, bias=False)
        self.q_lora = a.q_lora_rank is not None
        self.kv_a_proj = Linear(d, a.kv_lora_rank + a.qk_rope_head_dim, bias=False)
        self.kv_a_norm = RMSNorm(a.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = Linear(a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.o_proj = Linear(h * a.v_head_dim, d, bias=False)
        self.scale = a.softmax_scale
        self.window = None
        # Folding kv_b_proj into q and o (see _absorbed) saves expanding S latents (S*C*H*(N+Vd)) but
        # attends over C+R instead of N+R+Vd dims: cheaper while T*(2C - N - Vd) < C*(N + Vd).
        extra = 2 * a.kv_lora_rank - a.qk_nope_head_dim - a.v_head_dim
        saved = a.kv_lora_rank * (a.qk_nope_head_dim + a.v_head_dim)
        self.absorb_max_tokens = saved // extra if extra > 0 else 1 << 30

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTable,
        start_pos: int,
        cache: MLALayerCache,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        t, h = x.shape[0], self.heads
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_rot = q.view(t, h, self.nope + self.rope).split(
            [self.nope, self.rope], dim=-1
        )  # [T, H, N], [T, H, R]
        latent, k_rot = self.kv_a_proj(x).split([self.rank, self.rope], dim=-1)  # [T, C], [T, R]
        q_rot, k_rot = rotary.apply(q_rot, k_rot.unsqueeze(1), start_pos)  # [T, H, R], [T, 1, R]
        end = start_pos + t
        cache.latent[start_pos:end] = self.kv_a_norm(latent)
        cache.rope_key[start_pos:end] = k_rot[:, 0]
        if t <= self.absorb_max_tokens:
            return self._absorbed(q_nope, q_rot, cache, end, mask)
        kv = self.kv_b_proj(cache.latent[:end]).view(end, h, self.nope + self.v_dim)  # [S, H, N + Vd]
        k_nope, values = kv.split([self.nope, self.v_dim], dim=-1)  # [S, H, N], [S, H, Vd]
        keys = torch.cat(
            (k_nope, cache.rope_key[:end].unsqueeze(1).expand(end, h, self.rope)), dim=-1
        )  # [S, H, N+R]
        queries = torch.cat((q_nope, q_rot), dim=-1)  # [T, H, N+R]
        out = F.scaled_dot_product_attention(
            queries.transpose(0, 1).unsqueeze(0),  # [1, H, T, N+R]
            keys.transpose(0, 1).unsqueeze(0),  # [1, H, S, N+R]
            values.transpose(0, 1).unsqueeze(0),  # [1, H, S, Vd]
            attn_mask=mask,
            scale=self.scale,
        )  # [1, H, T, Vd]
        return self.o_proj(out[0].transpose(0, 1).reshape(t, h * self.v_dim))

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_rot: torch.Tensor,
        cache: MLALayerCache,
        end: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decode without expanding the cache: fold kv_b_proj into the query and the output.

        q_nope . (W_uk latent) = (q_nope W_uk) . latent, and attn @ (W_uv latent) = (attn @ latent) W_uv,
        so one step costs O(S * C) per head instead of expanding all S cached latents to keys/values.
        """
        t, h = q_nope.shape[0], self.heads
        w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, self.rank)  # [H, N + Vd, C]
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, N, C], [H, Vd, C]
        q_latent = torch.matmul(q_nope.transpose(0, 1), w_uk)  # [H, T, C]
        latent, rope_key = cache.latent[:end], cache.rope_key[:end]  # [S, C], [S, R]
        scores = torch.matmul(q_latent, latent.t()) + torch.matmul(
            q_rot.transpose(0, 1), rope_key.t()
        )  # [H, T, S]
        scores = scores * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)  # [H, T, S]
        context = torch.matmul(probs, latent)  # [H, T, C]
        out = torch.matmul(context, w_uv.transpose(1, 2))  # [H, T, Vd]
        return self.o_proj(out.transpose(0, 1).reshape(t, h * self.v_dim))
