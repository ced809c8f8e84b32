"""Convolutional sequence-to-sequence models (Gehring et al., "Convolutional Sequence to Sequence
Learning", ICML 2017: fairseq's ``fconv`` architecture), written here with plain torch layers.

Why not fairseq's own classes: see the README's Translation section (the optional ``fairseq`` extra
cannot be installed with torch pinned at 2.13.0). The architecture is the paper's:

* encoder: token + learned position embeddings -> linear to the conv width -> ``n`` blocks of
  ``Conv1d(C, 2C, k)`` + GLU with a residual scaled by sqrt(0.5) -> linear back to the embedding
  size. It returns the outputs ``z`` (attention keys) and ``z + e`` (attention values, the paper's
  "conditional input" trick);
* decoder: the same blocks with causal convolutions (left padding ``k - 1``), and after each block a
  dot-product attention over the source: query = (projected state + target embedding) * sqrt(0.5),
  context scaled by ``m * sqrt(1/m)`` (``m`` source positions), projected back and added with the
  residual scaling; then linear to the embedding size and the output projection to the vocabulary.

Weight normalisation is left out: it would hide each weight behind ``(g, v)`` so the spectral
parametrization of f-SFT could not reach it; initialisation follows the paper's variance
preserving scheme instead. Every trainable layer is an ``nn.Conv1d``, ``nn.Linear`` or
``nn.Embedding``, so f-SFT's spectral shifts cover the convolutions, the attention projections and
all linear projections (embeddings are not matrices it shifts), and NGF tunes ``output_projection``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smoothpurify.registry import Registry

PAD, BOS, EOS, UNK = 0, 1, 2, 3  # the sentencepiece ids the tokenizer is trained with (data.py)

MODELS = Registry("translation model")


def _linear(n_in: int, n_out: int, dropout: float = 0.0) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, std=math.sqrt((1 - dropout) / n_in))
    nn.init.zeros_(layer.bias)
    return layer


def _conv(channels: int, kernel: int, dropout: float, padding: int) -> nn.Conv1d:
    conv = nn.Conv1d(channels, 2 * channels, kernel, padding=padding)
    # Gehring et al. §3.5: keep the variance of GLU blocks' outputs (4 (1 - p) / (k C)).
    nn.init.normal_(conv.weight, std=math.sqrt(4 * (1 - dropout) / (kernel * channels)))
    nn.init.zeros_(conv.bias)
    return conv


def _embedding(num: int, dim: int) -> nn.Embedding:
    emb = nn.Embedding(num, dim, padding_idx=PAD)
    nn.init.normal_(emb.weight, std=0.1)
    with torch.no_grad():
        emb.weight[PAD].zero_()
    return emb


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    """Position index of each token, starting at 1; padding gets 0 (a zero embedding)."""
    mask = tokens.ne(PAD).long()
    return torch.cumsum(mask, dim=1) * mask


class FConvEncoder(nn.Module):
    def __init__(self, vocab: int, embed: int, channels: int, layers: int, kernel: int, max_len: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.embed_tokens, self.embed_positions = _embedding(vocab, embed), _embedding(max_len + 2, embed)
        self.fc1 = _linear(embed, channels, dropout)
        self.convs = nn.ModuleList(_conv(channels, kernel, dropout, kernel // 2) for _ in range(layers))
        self.fc2 = _linear(channels, embed)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        """``[B, S, 2E]``: the attention keys ``z`` and values ``z + e`` side by side. One tensor, not a
        tuple, so hooks on the encoder (NAD's feature stages) see a tensor like any other stage."""
        e = self.embed_tokens(src) + self.embed_positions(_positions(src).clamp_max(self.embed_positions.num_embeddings - 1))
        e = F.dropout(e, self.dropout, self.training)
        pad = src.eq(PAD)
        x = self.fc1(e).transpose(1, 2)  # [B, C, S]
        for conv in self.convs:
            res = x
            x = x.masked_fill(pad.unsqueeze(1), 0.0)  # padding must not leak into real positions
            x = F.glu(conv(F.dropout(x, self.dropout, self.training)), dim=1)
            x = (x + res) * math.sqrt(0.5)
        z = self.fc2(x.transpose(1, 2)).masked_fill(pad.unsqueeze(-1), 0.0)
        return torch.cat([z, (z + e) * math.sqrt(0.5)], dim=-1)


class Attention(nn.Module):
    """One decoder layer's attention (Gehring et al. §3.3)."""

    def __init__(self, channels: int, embed: int):
        super().__init__()
        self.in_projection, self.out_projection = _linear(channels, embed), _linear(embed, channels)

    def forward(self, x, target_embedding, keys, values, pad):
        query = (self.in_projection(x) + target_embedding) * math.sqrt(0.5)   # [B, T, E]
        scores = torch.bmm(query, keys.transpose(1, 2)).masked_fill(pad.unsqueeze(1), float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        lengths = (~pad).sum(1, keepdim=True).clamp_min(1).to(x.dtype).unsqueeze(-1)
        context = torch.bmm(attn, values) * lengths * torch.rsqrt(lengths)       # m * sqrt(1/m)
        return (self.out_projection(context) + x) * math.sqrt(0.5), attn


class FConvDecoder(nn.Module):
    def __init__(self, vocab: int, embed: int, channels: int, layers: int, kernel: int, max_len: int, dropout: float):
        super().__init__()
        self.dropout, self.kernel = dropout, kernel
        self.embed_tokens, self.embed_positions = _embedding(vocab, embed), _embedding(max_len + 2, embed)
        self.fc1 = _linear(embed, channels, dropout)
        self.convs = nn.ModuleList(_conv(channels, kernel, dropout, 0) for _ in range(layers))
        self.attention = nn.ModuleList(Attention(channels, embed) for _ in range(layers))
        self.fc2 = _linear(channels, embed)
        self.output_projection = _linear(embed, vocab, dropout)

    def forward(self, prev: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        # prev starts with BOS, so its positions are all >= 1 even when a sequence is all padding after it.
        e = self.embed_tokens(prev) + self.embed_positions(_positions(prev).clamp_max(self.embed_positions.num_embeddings - 1))
        e = F.dropout(e, self.dropout, self.training)
        x = self.fc1(e)                                   # [B, T, C]
        for conv, attention in zip(self.convs, self.attention):
            res = x
            h = F.dropout(x, self.dropout, self.training).transpose(1, 2)
            h = F.glu(conv(F.pad(h, (self.kernel - 1, 0))), dim=1).transpose(1, 2)  # causal: left padding only
            h, _ = attention(h, e, keys, values, pad)
            x = (h + res) * math.sqrt(0.5)
        x = F.dropout(self.fc2(x), self.dropout, self.training)
        return self.output_projection(x)


class FConvModel(nn.Module):
    """``model(src, prev_output_tokens) -> logits [B, T, vocab]`` (teacher forcing); ``model(packed)``
    with ``packed = stack([src, prev], 1)`` is the same (user data for ``smoothpurify purify`` is one tensor)."""

    classifier_name = "decoder.output_projection"  # NGF's layer, the core's "classifier"

    def __init__(self, num_classes: int, embed: int = 128, channels: int = 128, encoder_layers: int = 3,
                 decoder_layers: int = 3, kernel: int = 3, max_len: int = 256, dropout: float = 0.1):
        super().__init__()
        self.encoder = FConvEncoder(num_classes, embed, channels, encoder_layers, kernel, max_len, dropout)
        self.decoder = FConvDecoder(num_classes, embed, channels, decoder_layers, kernel, max_len, dropout)
        self.max_len = max_len

    def forward(self, src: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        if prev is None:  # one packed tensor [B, 2, L] (source, decoder input): ``smoothpurify purify``'s data
            src, prev = src[:, 0], src[:, 1]
        keys, values = self.encoder(src).chunk(2, dim=-1)
        return self.decoder(prev, keys, values, src.eq(PAD))

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy decoding: ``[B, <= max_len]`` token ids after BOS, EOS and what follows set to PAD.

        The decoder is re-run on the whole prefix each step (no incremental state): simpler, and the
        outputs at earlier positions are unchanged because the convolutions are causal.
        """
        was = self.training
        self.eval()
        keys, values = self.encoder(src).chunk(2, dim=-1)
        pad = src.eq(PAD)
        out = torch.full((len(src), 1), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
        for _ in range(min(max_len, self.max_len)):
            nxt = self.decoder(out, keys, values, pad)[:, -1].argmax(-1)
            nxt = nxt.masked_fill(done, PAD)
            out = torch.cat([out, nxt.unsqueeze(1)], dim=1)
            done |= nxt.eq(EOS)
            if bool(done.all()):
                break
        self.train(was)
        tokens = out[:, 1:]
        ended = torch.cumsum(tokens.eq(EOS).long(), dim=1) > 0
        return tokens.masked_fill(ended, PAD)


@MODELS.register("fconv_small")
def fconv_small(num_classes: int, max_len: int = 256, **kwargs) -> FConvModel:
    """CPU scale: 128-wide, 3 + 3 layers of kernel 3."""
    return FConvModel(num_classes, embed=128, channels=128, encoder_layers=3, decoder_layers=3, kernel=3,
                      max_len=max_len, **kwargs)


@MODELS.register("fconv_tiny")
def fconv_tiny(num_classes: int, max_len: int = 256, **kwargs) -> FConvModel:
    """Offline checks: 32-wide, one layer each."""
    return FConvModel(num_classes, embed=32, channels=32, encoder_layers=1, decoder_layers=1, kernel=3,
                      max_len=max_len, dropout=0.0, **kwargs)


@MODELS.register("fconv_iwslt_de_en")
def fconv_iwslt(num_classes: int, max_len: int = 1024, **kwargs) -> FConvModel:
    """fairseq's ``fconv_iwslt_de_en`` sizes (256-wide, 4 encoder and 3 decoder layers); GPU."""
    return FConvModel(num_classes, embed=256, channels=256, encoder_layers=4, decoder_layers=3, kernel=3,
                      max_len=max_len, dropout=0.2, **kwargs)
