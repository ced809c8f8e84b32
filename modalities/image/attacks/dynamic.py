"""Input-aware dynamic backdoor: every input gets its own trigger from a generator."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalities.image.attacks.nets import NetAttack, conv_net, diversity_loss, joint_train, seeded


class Dynamic(NetAttack):
    """Input-Aware Dynamic Backdoor (Nguyen & Tran, NeurIPS 2020, "Input-Aware Dynamic Backdoor Attack").

    Two generators map an input x to a pattern p(x) in [0, 1] and a near-binary mask m(x); the
    poisoned input is ``(1 - m(x)) x + m(x) p(x)``. Following the paper:

    1. The mask generator is trained first, alone (:meth:`fit`), with the diversity loss and a
       norm penalty ``lambda_norm * relu(mean(m) - density)`` (``mask_epochs`` 1 over at most
       ``mask_samples`` 5000 images, ``density`` 0.05 (paper 0.032, a little more area for a
       28x28 image), ``lambda_norm`` 100 as in the paper), then frozen.
    2. The pattern generator is trained jointly with the classifier (:meth:`train_model`): in each
       batch the samples chosen for poisoning (``poison_rate``) carry their own trigger and the
       target label; ``cross_ratio`` times as many other samples carry the trigger of a *different*
       input and keep their label (cross-trigger mode: a trigger works only on its own input); the
       generator also minimises the diversity loss ``||x - x'|| / ||p(x) - p(x')||``
       (``lambda_div`` 1). ``cross_ratio`` 1 matches the paper's p_cross = p_attack = 0.1; the
       generator uses Adam (``generator_lr`` 0.01), the classifier the run's SGD.

    Scale: the paper's generators are conv encoder-decoders; ours are 3-layer fully convolutional
    nets of ``width`` 16 (a few thousand weights, saved in the trigger file), so they run at any
    image size.
    """

    name = "dynamic"

    def build_nets(self) -> dict[str, nn.Module]:
        c = self.input_shape[0]
        width = int(self.options.get("width", 16))
        return {"pattern": conv_net(c, c, width), "mask": conv_net(c, 1, width)}

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        # A steep sigmoid: near-binary masks, still differentiable for the mask's own training.
        return torch.sigmoid(10 * self.nets["mask"](x))

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.nets["pattern"](x))

    def stamp(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``x`` with the trigger generated from ``source`` (``source is x``: the backdoor)."""
        m = self.masks(source)
        return (1 - m) * x + m * self.patterns(source)

    @torch.no_grad()
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.nets.to(x.device)
        return self.stamp(x, x)

    def poison_training_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        # The trigger changes while the generator trains, so poisoning happens on the fly in
        # ``train_model``; here only the share of samples to poison is fixed.
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[torch.from_numpy(self.choose_poisoned(y.numpy()))] = True
        return x.clone(), y.clone(), mask

    # ------------------------------------------------------------------ mask generator (stage 1)
    def fit(self, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any]) -> None:
        net = self.nets["mask"].to(context.get("device", "cpu")).train().requires_grad_(True)
        dev = context.get("device", "cpu")
        opt = torch.optim.Adam(net.parameters(), lr=float(self.options.get("mask_lr", 0.01)))
        density, lam_norm = float(self.options.get("density", 0.05)), float(self.options.get("lambda_norm", 100))
        lam_div = float(self.options.get("lambda_div", 1.0))
        n = min(len(x), int(self.options.get("mask_samples", 5000)))
        gen = torch.Generator().manual_seed(self.seed + 2)
        subset = x[torch.randperm(len(x), generator=gen)[:n]]
        bs = int(context["train"].get("batch_size", 128))
        for _ in range(int(self.options.get("mask_epochs", 1))):
            for idx in torch.randperm(n, generator=gen).split(bs):
                if len(idx) < 2:
                    continue
                xb = subset[idx].to(dev)
                x2 = xb.roll(1, dims=0)
                m1, m2 = self.masks(xb), self.masks(x2)
                loss = lam_norm * F.relu(m1.mean() - density) + lam_div * diversity_loss(xb, x2, m1, m2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval().requires_grad_(False)

    # ------------------------------------------------------------------ joint training (stage 2)
    def train_model(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    context: dict[str, Any]) -> list[float]:
        dev = context.get("device", "cpu")
        pattern = self.nets["pattern"].to(dev).train().requires_grad_(True)
        self.nets["mask"].to(dev)
        with seeded(self.seed):
            gopt = torch.optim.Adam(pattern.parameters(), lr=float(self.options.get("generator_lr", 0.01)))
        cross_ratio = float(self.options.get("cross_ratio", 1.0))
        lam_div = float(self.options.get("lambda_div", 1.0))

        def step(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
            bd = mask[idx].to(dev)
            clean_pos = torch.nonzero(~bd).flatten()
            n_cross = min(len(clean_pos), int(round(cross_ratio * int(bd.sum()))))
            cross = torch.zeros_like(bd)
            cross[clean_pos[:n_cross]] = True  # batch order is already random
            inputs, labels = xb.clone(), yb.clone()
            if bd.any():
                inputs[bd] = self.stamp(xb[bd], xb[bd])
                labels[bd] = self.target_of(yb[bd])
            div = torch.zeros((), device=dev)
            if cross.any():
                partners = xb.roll(1, dims=0)[cross]  # other inputs of the batch
                inputs[cross] = self.stamp(xb[cross], partners)
                div = diversity_loss(xb[cross], partners, self.patterns(xb[cross]), self.patterns(partners))
            loss = F.cross_entropy(model(inputs), labels)
            # The classifier's optimiser sees only ``loss``; the generator also gets the diversity term.
            return loss + lam_div * div

        losses = joint_train(model, x, y, context, step, generator_opt=gopt)
        pattern.eval().requires_grad_(False)
        self.nets.cpu()
        return losses



class DynamicAll(Dynamic):
    """Input-aware dynamic backdoor, all-to-all variant of the same paper: label ``y -> (y + 1) mod K``.

    The mapping is fixed by the name, whatever ``mapping`` the configuration gives.
    """

    name = "dynamic-all"

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["mapping"] = "all2all"
        super().__init__(*args, **kwargs)
