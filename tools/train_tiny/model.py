"""A small PyTorch BitNet b1.58 model for training (same math as transformers' BitNetForCausalLM).

BitLinear (the b1.58 recipe, quantization-aware training with fake quantization):
  weights:      s_w = mean|W| (per tensor, clamp 1e-5), W_q = clamp(round(W / s_w), -1, 1) * s_w
  activations:  s_x = 127 / max|x| (per token, clamp 1e-5), x_q = clamp(round(x * s_x), -128, 127) / s_x
  forward uses W_q and x_q; backward is the straight-through estimator (gradients pass unchanged).
The exported offline checkpoint stores round(W / s_w) as packed ternary codes and s_w as
`weight_scale`, so transformers computes y = (x_q @ codes^T) * s_w: the same function.

Decoder layer (2B4T):
  h   = x + o_proj(attn_sub_norm(attention(input_layernorm(x))))
  out = h + down_proj(ffn_sub_norm(relu(gate_proj(y))^2 * up_proj(y))),  y = post_attention_layernorm(h)
logits = norm(x) @ embed_tokens^T (tied, not quantized). RoPE half-split, GQA, causal attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 5
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().mean().clamp(min=1e-5)
    return (w / s).round().clamp(-1, 1) * s


def act_quant(x: torch.Tensor) -> torch.Tensor:
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


class _STEWeight(torch.autograd.Function):
    """Ternary fake-quant of the weight; straight-through estimator in the backward."""

    @staticmethod
    def forward(ctx, w):
        return weight_quant(w)

    @staticmethod
    def backward(ctx, g):
        return g


class _STEAct(torch.autograd.Function):
    """Per-token int8 fake-quant of the activation; straight-through estimator in the backward."""

    @staticmethod
    def forward(ctx, x):
        return act_quant(x)

    @staticmethod
    def backward(ctx, g):
        return g


class BitLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_STEAct.apply(x), _STEWeight.apply(self.weight))

    @torch.no_grad()
    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes in {-1,0,1} as int8 [out,in], scale s_w as a 0-d f32 tensor)."""
        w = self.weight.float()
        s = w.abs().mean().clamp(min=1e-5)
        return (w / s).round().clamp(-1, 1).to(torch.int8), s


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cache(cfg: Config, T: int):
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)  # [T, d/2]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = BitLinear(H, cfg.num_attention_heads * d)
        self.k_proj = BitLinear(H, cfg.num_key_value_heads * d)
        self.v_proj = BitLinear(H, cfg.num_key_value_heads * d)
        self.o_proj = BitLinear(cfg.num_attention_heads * d, H)
        self.attn_sub_norm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.cfg
        d = c.head_dim
        q = self.q_proj(x).view(B, T, c.num_attention_heads, d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = c.num_attention_heads // c.num_key_value_heads
        k = k.repeat_interleave(rep, dim=1)   # query head h reads kv head h // rep
        v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(B, T, c.num_attention_heads * d)
        return self.o_proj(self.attn_sub_norm(o))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = BitLinear(H, I)
        self.up_proj = BitLinear(H, I)
        self.down_proj = BitLinear(I, H)
        self.ffn_sub_norm = RMSNorm(I, cfg.rms_norm_eps)

    def forward(self, x):
        return self.down_proj(self.ffn_sub_norm(F.relu(self.gate_proj(x)).square() * self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Inner(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TinyBitNet(nn.Module):
    """Parameter names match transformers' BitNetForCausalLM (`model.…`), the head is tied."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.model = Inner(cfg)
        std = cfg.initializer_range
        for n, p in self.named_parameters():
            if n.endswith("norm.weight"):
                continue
            nn.init.normal_(p, mean=0.0, std=std)
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.data.mul_(1.0 / math.sqrt(2 * cfg.num_hidden_layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        cos, sin = rope_cache(self.cfg, T)
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        return F.linear(x, self.model.embed_tokens.weight)

    def bitlinears(self):
        return {n: m for n, m in self.named_modules() if isinstance(m, BitLinear)}
