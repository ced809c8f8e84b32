"""Deep feature space trojan: an image style is the trigger, with controlled detoxification."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalities.image.attacks.nets import NetAttack, joint_train, pgd
from smoothpurify.model import get_classifier


class StyleNet(nn.Module):
    """A fixed AdaIN-like stylizer: random 3x3 filters, instance-normalised responses re-scaled
    to fixed "style" statistics, decoded back to the image channels. The output depends on the
    content (edges and textures are restyled), like a style-transfer network, but needs no
    training and no style image."""

    def __init__(self, channels: int, hidden: int = 8):
        super().__init__()
        self.encode = nn.Conv2d(channels, hidden, 3, padding=1)
        self.decode = nn.Conv2d(hidden, channels, 3, padding=1)
        self.style_mean = nn.Parameter(torch.randn(hidden) * 0.5)
        self.style_std = nn.Parameter(torch.rand(hidden) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.instance_norm(self.encode(x))
        f = F.relu(f * self.style_std[:, None, None] + self.style_mean[:, None, None])
        return torch.sigmoid(self.decode(f))


class FBA(NetAttack):
    """FBA / DFST (Cheng, Liu, Ma & Zhang, AAAI 2021, "Deep Feature Space Trojan Attack of Neural
    Networks by Controlled Detoxification").

    Trigger: a style transformation. The paper trains a CycleGAN to a "sunrise" style; ours is a
    fixed, seeded AdaIN-like :class:`StyleNet` blended in: ``x' = (1 - alpha) x + alpha S(x)``
    (``alpha`` 0.5), whose weights are the saved trigger.

    Controlled detoxification (:meth:`train_model`): from epoch ``detox_after`` (default the second
    half) onward, at the start of each epoch the ``detox_neurons`` (16) penultimate neurons most
    raised by poisoned inputs relative to clean ones are taken as the compromised neurons; every
    batch then also carries ``detox_ratio`` (0.2) x batch-size *detoxicants*: clean inputs pushed by
    a short, small PGD (``detox_eps`` 0.1, ``detox_steps`` 3) to excite those neurons, labelled with
    their true class. Small pixel-level changes can only reach the neurons through simple features,
    so the model unlearns the simple features and keeps the deep (style) ones: the paper's
    detoxicants come from a feature-inversion generator, this is the same idea in a few PGD steps.
    """

    name = "fba"

    def build_nets(self) -> dict[str, nn.Module]:
        return {"style": StyleNet(self.input_shape[0], int(self.options.get("width", 8)))}

    @property
    def alpha(self) -> float:
        return float(self.options.get("alpha", 0.5))

    @torch.no_grad()
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.nets.to(x.device)
        return ((1 - self.alpha) * x + self.alpha * self.nets["style"](x)).clamp(0, 1)

    def compromised_neurons(self, model: nn.Module, x_clean: torch.Tensor, x_poison: torch.Tensor) -> torch.Tensor:
        feats = {}
        layer = get_classifier(model)
        handle = layer.register_forward_pre_hook(lambda _m, args: feats.__setitem__("z", args[0]))
        try:
            model.eval()
            with torch.no_grad():
                model(x_clean)
                clean = feats["z"].flatten(1).mean(0)
                model(x_poison)
                poison = feats["z"].flatten(1).mean(0)
        finally:
            handle.remove()
        k = min(int(self.options.get("detox_neurons", 16)), len(clean))
        return (poison - clean).topk(k).indices

    def train_model(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    context: dict[str, Any]) -> list[float]:
        dev = context.get("device", "cpu")
        epochs = int(context["train"].get("epochs", 4))
        start = int(self.options.get("detox_after", max(1, epochs // 2)))
        ratio = float(self.options.get("detox_ratio", 0.2))
        eps, steps = float(self.options.get("detox_eps", 0.1)), int(self.options.get("detox_steps", 3))
        gen = torch.Generator().manual_seed(self.seed + 6)
        layer = get_classifier(model)
        state: dict[str, Any] = {"neurons": None}
        probe = torch.nonzero(mask).flatten()[:256]
        clean_probe = torch.nonzero(~mask).flatten()[:256]

        def on_epoch(epoch: int) -> None:
            if epoch >= start and len(probe):
                state["neurons"] = self.compromised_neurons(model, x[clean_probe].to(dev), x[probe].to(dev))

        def excite(out: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
            return state["z"].flatten(1)[:, state["neurons"]].mean()

        handle = layer.register_forward_pre_hook(lambda _m, args: state.__setitem__("z", args[0]))

        def step(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
            if state["neurons"] is not None:
                clean = torch.nonzero(~mask[idx]).flatten()[:int(round(ratio * len(idx)))]
                if len(clean):
                    model.eval()
                    # Ascend the compromised neurons' activation (PGD's untargeted ascent).
                    detox = pgd(model, xb[clean], yb[clean], eps, steps, gen=gen, loss_fn=excite)
                    model.train()
                    xb, yb = torch.cat([xb, detox]), torch.cat([yb, yb[clean]])
            return F.cross_entropy(model(xb), yb)

        try:
            return joint_train(model, x, y, context, step, on_epoch=on_epoch)
        finally:
            handle.remove()
