"""ISSBA: a sample-specific invisible trigger from a steganographic encoder."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalities.image.attacks.nets import NetAttack, conv_net


class Encoder(nn.Module):
    """StegaStamp-style encoder: the bit string goes through a dense layer to a one-channel image
    that is stacked with the input; a conv net turns both into a residual."""

    def __init__(self, channels: int, height: int, width: int, bits: int, hidden: int = 16):
        super().__init__()
        self.shape = (height, width)
        self.secret = nn.Linear(bits, height * width)
        self.body = conv_net(channels + 1, channels, hidden)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        plane = self.secret(bits * 2 - 1).view(len(x), 1, *self.shape)
        return self.body(torch.cat([x, plane], dim=1))


class Decoder(nn.Module):
    """Recovers the bits from an encoded image (two strided convs, global pooling, a dense layer)."""

    def __init__(self, channels: int, bits: int, hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, hidden, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, hidden, 3, 2, 1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * hidden, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ISSBA(NetAttack):
    """ISSBA (Li, Li, Wu, Li, He & Lyu, ICCV 2021, "Invisible Backdoor Attack with Sample-Specific Triggers").

    An encoder-decoder pair is trained (:meth:`fit`, on clean training images, random bit strings
    each step) so that the decoder reads the bit string back from the encoded image while the
    residual stays small: ``loss = BCE(decoder(x'), bits) + ramp * lambda_residual * mean(r^2)``,
    the image-loss weight ramped up from zero over the first half as StegaStamp does (a full
    weight from the start collapses the residual to zero). The attack then encodes one fixed,
    seeded bit string (``bits`` 16; the paper encodes the target class name) into every poisoned
    image: ``x' = clip(x + r(x))`` with ``r = eps * tanh(encoder(x, secret))``. The residual
    differs per image (sample-specific) and is bounded by ``eps`` (0.1); with ``lambda_residual``
    5 its RMS is ~0.045 on Fashion-MNIST (PSNR ~27 dB, the paper's level) and the decoder recovers
    all bits. At ``eps`` 0.05: PSNR ~29.5 dB, 91% of the bits, and still ASR 99.9% in the smoke
    profile; 0.1 is the default because there the residual really carries the whole message.

    Scale: the paper uses StegaStamp (a U-Net encoder, a spatial-transformer decoder, perceptual
    and adversarial losses, 100-bit strings, 140k steps on ImageNet); ours is a 3-layer conv encoder
    and a 2-conv decoder trained for ``encoder_steps`` (1000) Adam steps (batch 64) on at most
    ``encoder_samples`` (4000) images with the BCE + L2 losses only. The encoder weights and the
    secret are the saved trigger; the decoder stays in memory (``self.decoder``,
    ``self.bit_accuracy``) as evidence that the residual carries the message.
    """

    name = "issba"

    def build_nets(self) -> dict[str, nn.Module]:
        c, h, w = self.input_shape
        self.decoder = Decoder(c, self.n_bits)
        return {"encoder": Encoder(c, h, w, self.n_bits, int(self.options.get("width", 16)))}

    @property
    def n_bits(self) -> int:
        return int(self.options.get("bits", 16))

    def extra_trigger(self) -> dict[str, torch.Tensor]:
        return {"secret": torch.randint(0, 2, (self.n_bits,), generator=self.generator).float()}

    @property
    def eps(self) -> float:
        return float(self.options.get("eps", 0.1))

    def residual(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return self.eps * torch.tanh(self.nets["encoder"](x, bits))

    @torch.no_grad()
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.nets.to(x.device)
        secret = self.trigger["secret"].to(x.device).expand(len(x), -1)
        return (x + self.residual(x, secret)).clamp(0, 1)

    def fit(self, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any]) -> None:
        dev = context.get("device", "cpu")
        enc, dec = self.nets["encoder"].to(dev).train().requires_grad_(True), self.decoder.to(dev).train()
        params = list(enc.parameters()) + list(dec.parameters())
        opt = torch.optim.Adam(params, lr=float(self.options.get("encoder_lr", 3e-3)))
        lam = float(self.options.get("lambda_residual", 5.0))
        gen = torch.Generator().manual_seed(self.seed + 3)
        pool = x[torch.randperm(len(x), generator=gen)[:int(self.options.get("encoder_samples", 4000))]]
        bs, steps = 64, int(self.options.get("encoder_steps", 1000))
        for step in range(steps):
            xb = pool[torch.randint(0, len(pool), (bs,), generator=gen)].to(dev)
            bits = torch.randint(0, 2, (bs, self.n_bits), generator=gen).float().to(dev)
            r = self.residual(xb, bits)
            logits = dec((xb + r).clamp(0, 1))
            # StegaStamp ramps the image loss up from zero: first learn to carry the bits, then shrink.
            ramp = min(1.0, step / max(1, steps // 2))
            loss = F.binary_cross_entropy_with_logits(logits, bits) + ramp * lam * r.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        enc.eval().requires_grad_(False)
        dec.eval().requires_grad_(False)
        self.bit_accuracy = self.decode_accuracy(pool[:512].to(dev))
        self.nets.cpu()
        self.decoder.cpu()

    @torch.no_grad()
    def decode_accuracy(self, x: torch.Tensor) -> float:
        """Share of the fixed secret's bits the decoder recovers from encoded images."""
        secret = self.trigger["secret"].to(x.device)
        decoded = (self.decoder.to(x.device)(self.apply(x)) > 0).float()
        return float((decoded == secret).float().mean())
