"""Multi-label models: a CNN backbone and an ML-Decoder head.

ML-Decoder (Ridnik et al., "ML-Decoder: Scalable and Versatile Classification Head", WACV 2023,
§3), written here from the paper: the backbone's spatial tokens are embedded, ``G`` group queries
attend to them in ONE transformer-decoder layer with the self-attention removed (cross-attention
+ feed-forward, each with a residual and layer norm), and *group fully-connected pooling* maps
query ``g`` to its ``k = ceil(C / G)`` classes with its own weights. No positional encoding: the
head is invariant to the order of the spatial tokens (a label set has no position).

The layer the core tunes as "the classifier" (NGF, FST) is the head's final group-FC
(``classifier_name = "head.group_fc"``); f-SFT's spectral parametrization covers every conv, the
head's linear layers and its attention projections.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from smoothpurify.registry import Registry

MODELS = Registry("model")


class GroupFC(nn.Module):
    """Group fully-connected pooling: ``out[:, g * k + j] = <h[:, g], W[g, :, j]> + b[g * k + j]``."""

    def __init__(self, num_groups: int, dim: int, num_classes: int):
        super().__init__()
        self.num_groups, self.dim, self.num_classes = num_groups, dim, num_classes
        self.per_group = math.ceil(num_classes / num_groups)
        self.weight = nn.Parameter(torch.empty(num_groups, dim, self.per_group))
        self.bias = nn.Parameter(torch.empty(num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.dim)  # nn.Linear's default for a fan-in of dim
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bgd,gdk->bgk", h, self.weight).flatten(1)
        return out[:, : self.num_classes] + self.bias

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, dim={self.dim}, classes={self.num_classes}"


class MLDecoder(nn.Module):
    """ML-Decoder head over a feature map ``[B, C_in, H, W]``; returns logits ``[B, num_classes]``."""

    def __init__(self, in_channels: int, num_classes: int, dim: int = 64, heads: int = 4,
                 num_groups: int | None = None, ff_mult: int = 2, dropout: float = 0.0):
        super().__init__()
        groups = min(num_classes, num_groups or 100)  # the paper caps the queries at 100 groups
        self.embed = nn.Linear(in_channels, dim)
        self.queries = nn.Parameter(torch.randn(groups, dim) * dim ** -0.5)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_q, self.norm_attn, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                nn.Linear(ff_mult * dim, dim))
        self.dropout = nn.Dropout(dropout)
        self.group_fc = GroupFC(groups, dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = torch.relu(self.embed(features.flatten(2).transpose(1, 2)))  # [B, HW, dim]
        q = self.norm_q(self.queries).unsqueeze(0).expand(len(tokens), -1, -1)
        # need_weights=True takes the explicit softmax path: the fused CPU kernel has no double
        # backward, which the Fisher-trace term (SFT) needs.
        attended, _ = self.attn(q, tokens, tokens, need_weights=True)
        h = self.norm_attn(q + self.dropout(attended))
        h = self.norm_ff(h + self.dropout(self.ff(h)))
        return self.group_fc(h)


def _conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class MultiLabelNet(nn.Module):
    """``backbone`` (a Sequential of stages, so NAD finds its last stages) + ``head`` (ML-Decoder)."""

    classifier_name = "head.group_fc"

    def __init__(self, backbone: nn.Sequential, channels: int, num_classes: int, dim: int, heads: int):
        super().__init__()
        self.backbone = backbone
        self.head = MLDecoder(channels, num_classes, dim=dim, heads=heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@MODELS.register("cnn_mldecoder")
def cnn_mldecoder(num_classes: int, in_channels: int = 1, width: int = 16) -> MultiLabelNet:
    """Small CNN + ML-Decoder head, sized for a CPU (smoke default).

    Four conv stages: a strided stem, then two pooled stages; a 56x56 mosaic becomes a 7x7 grid of
    4*width-channel tokens (about 9 M multiply-adds per image)."""
    stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    backbone = nn.Sequential(stem, _conv_block(width, 2 * width, True), _conv_block(2 * width, 4 * width, True),
                             _conv_block(4 * width, 4 * width, False))
    return MultiLabelNet(backbone, 4 * width, num_classes, dim=64, heads=4)


@MODELS.register("resnet18_mldecoder")
def resnet18_mldecoder(num_classes: int, in_channels: int = 3) -> MultiLabelNet:
    """ResNet-18 (He et al. 2016, ImageNet stem) + ML-Decoder, the paper profile's model."""
    stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))
    stages, c_in = [stem], 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
        c_in = c_out
    return MultiLabelNet(nn.Sequential(*stages), 512, num_classes, dim=256, heads=8)
