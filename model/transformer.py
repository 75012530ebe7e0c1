"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

Shapes: B batch, S source length, T target length (new tokens), P past length, D d_model, H heads, Dh head dim.
The self-attention cache is an explicit value: `past` in, `present` out, one (key, value) pair per decoder layer,
each (B, H, P, Dh). The cross-attention keys and values depend only on the encoder output, so they are computed
once per source (`Decoder.cross_kv`) and handed to every step.

The decoder's rows may be G per source (G beams or samples), source n's G rows next to each other (rows n*G to
n*G+G-1); the cross-attention keys and values are held once per source (N, H, S, Dh) and read by all its rows,
never copied to them. Cross-attention has no mask between queries, so a source's G rows attend as one query
sequence of length G*T: (B, T, D) -> (N, G*T, D), the same numbers as G copies of the source.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeformer.model.config import TransformerConfig

KV = tuple[Tensor, Tensor]  # (key, value), each (B, H, len, Dh)

# Added to attention scores at masked positions. Finite, so that a fully masked row cannot produce NaN.
NEG_INF = -1e9


def padding_bias(mask: Tensor) -> Tensor:
    """(B, S) with 1 for tokens and 0 for padding -> additive bias (B, 1, 1, S)."""
    return (1.0 - mask[:, None, None, :].float()) * NEG_INF


def causal_bias(t: int, past_len: int, device: torch.device) -> Tensor:
    """Query i (absolute position past_len + i) may see keys 0..past_len + i: bias (1, 1, T, P + T)."""
    q_pos = torch.arange(t, device=device) + past_len  # (T,)
    k_pos = torch.arange(t + past_len, device=device)  # (P+T,)
    return (k_pos[None, :] > q_pos[:, None]).float()[None, None] * NEG_INF


class PositionalEncoding(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D)).

    Computed from the positions on every call rather than read from a table, so it has no length bound.
    """

    inv_freq: Tensor

    def __init__(self, d_model: int, layout: str = "interleaved") -> None:
        super().__init__()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.interleaved = layout == "interleaved"

    def forward(self, positions: Tensor) -> Tensor:
        angles = positions[:, None].float() * self.inv_freq[None, :]  # (T, D/2)
        if self.interleaved:
            return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (T, D): sin, cos, sin, ...
        return torch.cat((angles.sin(), angles.cos()), dim=-1)  # (T, D): sines, then cosines


class LearnedPositionalEncoding(nn.Module):
    def __init__(self, max_positions: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, d_model))

    def forward(self, positions: Tensor) -> Tensor:
        return F.embedding(positions, self.weight)  # (T, D)


class Embeddings(nn.Module):
    """Token embedding scaled by sqrt(D), plus position encoding, then dropout."""

    def __init__(self, config: TransformerConfig, tokens: nn.Embedding) -> None:
        super().__init__()
        self.tokens = tokens
        self.scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0
        self.positions: PositionalEncoding | LearnedPositionalEncoding
        if config.position == "sinusoidal":
            self.positions = PositionalEncoding(config.d_model, config.sinusoid)
        else:
            self.positions = LearnedPositionalEncoding(config.max_positions, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device) + offset  # (T,)
        return self.dropout(self.tokens(ids) * self.scale + self.positions(positions))  # (B, T, D)


class MultiHeadAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, x: Tensor) -> KV:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))  # (B, H, S, Dh) each

    def forward(self, x: Tensor, kv: KV, bias: Tensor, shape: torch.Size | None = None) -> Tensor:
        """shape: the output's, when it is not x's (a source's rows grouped as one query, DecoderLayer)."""
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        k, v = kv  # (B, H, S, Dh)
        scores = (q @ k.transpose(-2, -1)) * self.scale + bias  # (B, H, T, S)
        attn = self.dropout(scores.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2)  # (B, T, H, Dh)
        return self.out_proj(out.reshape(shape if shape is not None else x.shape))  # (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.activation = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[config.activation]()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class SubLayer(nn.Module):
    """Residual connection with layer norm: post-norm LN(x + f(x)) as the paper, or pre-norm x + f(LN(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def input(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.pre_norm else x

    def output(self, x: Tensor, fx: Tensor) -> Tensor:
        y = x + self.dropout(fx)
        return y if self.pre_norm else self.norm(y)


class EncoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.self_attn_block = SubLayer(config)
        self.ffn = FeedForward(config)
        self.ffn_block = SubLayer(config)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        h = self.self_attn_block.input(x)
        x = self.self_attn_block.output(x, self.self_attn(h, self.self_attn.project_kv(h), bias))
        return self.ffn_block.output(x, self.ffn(self.ffn_block.input(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.self_attn_block = SubLayer(config)
        self.cross_attn = MultiHeadAttention(config)
        self.cross_attn_block = SubLayer(config)
        self.ffn = FeedForward(config)
        self.ffn_block = SubLayer(config)

    def forward(self, x: Tensor, self_bias: Tensor, past: KV, cross: KV, cross_bias: Tensor) -> tuple[Tensor, KV]:
        h = self.self_attn_block.input(x)
        k, v = self.self_attn.project_kv(h)  # (B, H, T, Dh)
        present = (torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2))  # (B, H, P+T, Dh)
        x = self.self_attn_block.output(x, self.self_attn(h, present, self_bias))
        h = self.cross_attn_block.input(x)  # (B, T, D), B = N*G rows for N sources
        sources = cross[0].shape[0]
        if not torch.compiler.is_exporting() and h.shape[0] % sources:  # the graph's caller is the runtime
            raise ValueError(f"{h.shape[0]} decoder rows for {sources} sources: give each source as many rows")
        grouped = h.reshape(sources, -1, h.shape[-1])  # (N, G*T, D): a source's rows as one query
        x = self.cross_attn_block.output(x, self.cross_attn(grouped, cross, cross_bias, h.shape))
        x = self.ffn_block.output(x, self.ffn(self.ffn_block.input(x)))
        return x, present


class Encoder(nn.Module):
    def __init__(self, config: TransformerConfig, tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed = Embeddings(config, tokens)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.has_final_norm else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embed(input_ids)  # (B, S, D)
        bias = padding_bias(attention_mask)  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, bias)
        return self.norm(x) if self.norm is not None else x


class Decoder(nn.Module):
    def __init__(self, config: TransformerConfig, tokens: nn.Embedding) -> None:
        super().__init__()
        self.config = config
        self.embed = Embeddings(config, tokens)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.has_final_norm else None
        self.output_projection = (None if config.tie_output
                                  else nn.Linear(config.d_model, config.tgt_vocab_size, bias=False))
        self.output_bias = nn.Parameter(torch.zeros(config.tgt_vocab_size)) if config.output_bias else None

    def cross_kv(self, memory: Tensor) -> list[KV]:
        """The cross-attention keys and values of every layer, computed once per source."""
        return [layer.cross_attn.project_kv(memory) for layer in self.layers]  # type: ignore[union-attr,operator]

    def empty_past(self, batch: int, device: torch.device | None = None) -> list[KV]:
        shape = (batch, self.config.n_heads, 0, self.config.head_dim)
        return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in self.layers]

    def forward(self, input_ids: Tensor, encoder_attention_mask: Tensor, cross: list[KV],
                past: list[KV], target_mask: Tensor | None = None) -> tuple[Tensor, list[KV]]:
        """input_ids (B, T) -> logits (B, T, V) and the grown cache.

        encoder_attention_mask (N, S) and cross (N, H, S, Dh) are per source; B = N*G rows, source n's G rows
        next to each other (G beams or samples share their source's keys and values).

        target_mask (B, P+T), 1 for tokens and 0 for padding, is only needed when targets are padded on the
        left; right padding is already hidden by the causal mask.
        """
        past_len = past[0][0].shape[2]
        x = self.embed(input_ids, offset=past_len)  # (B, T, D)
        self_bias = causal_bias(input_ids.shape[1], past_len, input_ids.device)  # (1, 1, T, P+T)
        if target_mask is not None:
            self_bias = self_bias + padding_bias(target_mask)  # (B, 1, T, P+T)
        cross_bias = padding_bias(encoder_attention_mask)  # (N, 1, 1, S)
        present = []
        for layer, layer_past, layer_cross in zip(self.layers, past, cross, strict=True):
            x, layer_present = layer(x, self_bias, layer_past, layer_cross, cross_bias)
            present.append(layer_present)
        if self.norm is not None:
            x = self.norm(x)
        if self.output_projection is None:
            logits = x @ self.embed.tokens.weight.t()  # (B, T, V)
        else:
            logits = self.output_projection(x)
        if self.output_bias is not None:
            logits = logits + self.output_bias
        return logits, present


class Transformer(nn.Module):
    family = "encoder-decoder"  # how it is exported and run (runtime/families.py)

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        src_tokens = nn.Embedding(config.src_vocab_size, config.d_model, padding_idx=config.pad_id)
        tgt_tokens = (src_tokens if config.share_embeddings
                      else nn.Embedding(config.tgt_vocab_size, config.d_model, padding_idx=config.pad_id))
        self.encoder = Encoder(config, src_tokens)
        self.decoder = Decoder(config, tgt_tokens)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if "tokens" in name or "positions" in name:
                nn.init.normal_(p, std=self.config.d_model ** -0.5)
            elif p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for emb in (self.encoder.embed.tokens, self.decoder.embed.tokens):
            with torch.no_grad():
                emb.weight[self.config.pad_id].zero_()

    def check_lengths(self, *lengths: int) -> None:
        if self.config.position == "learned" and max(lengths) > self.config.max_positions:
            raise ValueError(f"sequence of {max(lengths)} positions exceeds this model's learned position table "
                             f"(max_positions={self.config.max_positions}); shorten the input")

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        self.check_lengths(src_ids.shape[1])
        if src_mask is None:
            src_mask = (src_ids != self.config.pad_id).long()
        return self.encoder(src_ids, src_mask)  # (B, S, D)

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing over the whole target, no cache: (B, S), (B, T) -> logits (B, T, V)."""
        if src_mask is None:
            src_mask = (src_ids != self.config.pad_id).long()
        self.check_lengths(tgt_ids.shape[1])
        memory = self.encode(src_ids, src_mask)
        past = self.decoder.empty_past(src_ids.shape[0], src_ids.device)
        logits, _ = self.decoder(tgt_ids, src_mask, self.decoder.cross_kv(memory), past, tgt_mask)
        return logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
