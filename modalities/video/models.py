"""Per-frame CNN + LSTM + linear classifier (the SFT paper's Table 3 model is ResNet-50 + LSTM), in
plain PyTorch.

Clips are ``[B, C, T, H, W]`` in [0, 1]. The per-frame encoders are written with ``Conv3d`` kernels
``(1, k, k)``: exactly a 2D convolution applied to every frame, but the layer sees the batch on dim 0
(``[B, C, T, H, W]``) instead of ``[B * T, C, H, W]``, so the core's fast per-sample Fisher path
(ghost norms; it needs the batch on dim 0) covers the encoder.

The LSTM (Hochreiter & Schmidhuber 1997; gates i, f, g, o in ``torch.nn.LSTM``'s order and equations)
is written with two ``nn.Linear`` layers, ``ih`` (input-hidden, ``weight_ih``, with the bias) and ``hh``
(hidden-hidden, ``weight_hh``), rather than ``nn.LSTM``: f-SFT's spectral parametrisation, the
per-sample Fisher (vmap: ``nn.LSTM``'s fused kernel has no batching rule) and the ghost-norm trace
(it sums a layer's calls, here the ``T`` time steps of ``hh``) then cover both matrices with the core's
existing Linear paths; no LSTM-specific code in the core. ``tests/test_video.py`` checks the cell
against ``nn.LSTM`` with copied weights.
"""
from __future__ import annotations

import torch
from torch import nn

from smoothpurify.registry import Registry

MODELS = Registry("video model")


class LSTM(nn.Module):
    """One LSTM layer over ``[B, T, F]``; returns every hidden state ``[B, T, H]``."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size)                 # W_ih x_t + (b_ih + b_hh)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)   # W_hh h_{t-1}
        bound = hidden_size ** -0.5                                      # nn.LSTM's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates_x = self.ih(x)                                             # one call over all steps
        h = x.new_zeros(x.shape[0], self.hidden_size)
        c = torch.zeros_like(h)
        out = []
        for t in range(x.shape[1]):
            i, f, g, o = (gates_x[:, t] + self.hh(h)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out, 1)


def frame_conv(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, (1, k, k), stride=(1, stride, stride), padding=(0, k // 2, k // 2), bias=False)


class SmallFrameCNN(nn.Module):
    """Three conv-BN-ReLU-pool stages per frame, then a linear projection of the flattened map
    (not a global pool: the motion classes are defined by WHERE the item is, which pooling erases)."""

    def __init__(self, channels: int, size: int, width: int = 16, features: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for w in (width, 2 * width, 4 * width):
            layers += [frame_conv(c, w), nn.BatchNorm3d(w), nn.ReLU(), nn.MaxPool3d((1, 2, 2))]
            c = w
        self.convs = nn.Sequential(*layers)
        self.project = nn.Linear(c * (size // 8) ** 2, features)
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x)                                                 # [B, C', T, h, w]
        return torch.relu(self.project(h.transpose(1, 2).flatten(2)))    # [B, T, features]


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) on every frame."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = frame_conv(c_in, c_out, 3, stride), nn.BatchNorm3d(c_out)
        self.conv2, self.bn2 = frame_conv(c_out, c_out), nn.BatchNorm3d(c_out)
        self.shortcut = (nn.Sequential(frame_conv(c_in, c_out, 1, stride), nn.BatchNorm3d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetFrames(nn.Module):
    """ResNet-18 per frame (He et al. 2016: [2, 2, 2, 2] basic blocks), globally pooled per frame."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(channels, width, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
                                  nn.BatchNorm3d(width), nn.ReLU(), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        blocks, c = [], width
        for k, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
            blocks += [BasicBlock(c, w, 1 if k == 0 else 2), BasicBlock(w, w, 1)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.features = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean((3, 4)).transpose(1, 2)   # [B, T, features]


class CNNLSTM(nn.Module):
    """Frame encoder -> LSTM -> linear classifier on the last hidden state."""

    classifier_name = "head"

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.lstm = LSTM(encoder.features, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x - 0.5) / 0.25: inputs stay in [0, 1] for attacks and input-space defenses (AWM, I-BAU clip there).
        return self.head(self.lstm(self.encoder((x - 0.5) * 4.0))[:, -1])


@MODELS.register("cnn_lstm")
def cnn_lstm(num_classes: int, channels: int = 1, frames: int = 8, size: int = 32) -> nn.Module:
    """The CPU model: a 3-stage frame CNN (16-32-64 channels), 128 features, LSTM 128 (~290k weights
    at 32 x 32)."""
    return CNNLSTM(SmallFrameCNN(channels, size), 128, num_classes)


@MODELS.register("cnn_lstm_tiny")
def cnn_lstm_tiny(num_classes: int, channels: int = 1, frames: int = 8, size: int = 32) -> nn.Module:
    """Half the widths (tests, conformance)."""
    return CNNLSTM(SmallFrameCNN(channels, size, width=8, features=64), 64, num_classes)


@MODELS.register("resnet18_lstm")
def resnet18_lstm(num_classes: int, channels: int = 3, frames: int = 16, size: int = 112) -> nn.Module:
    """ResNet-18 frame encoder + LSTM 512: the paper profile's model (the paper's is ResNet-50 + LSTM)."""
    return CNNLSTM(ResNetFrames(channels), 512, num_classes)
