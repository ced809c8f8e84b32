"""Backdoor attacks on video classifiers (SFT paper Table 3).

Clips are ``[N, C, T, H, W]`` in [0, 1]; a patch is stamped at the same place in every frame.

* ``clean-label``: Zhao, Ma, Zheng, Bailey, Chen & Jiang, "Clean-Label Backdoor Attacks on Video
  Recognition Models", CVPR 2020. (1) A universal adversarial trigger: a ``size`` x ``size`` patch
  found by signed-gradient steps that lower a clean surrogate's cross-entropy towards the target
  class over non-target training clips stamped with it. (2) The poisoned clips (a share of the
  target class, labels unchanged) are first perturbed by L_inf PGD (``eps``) that raises the
  surrogate's loss on their true label, erasing the natural features the model would otherwise
  learn them by, and then stamped with the trigger in every frame. The surrogate has the run's own
  architecture and is trained on the clean training set (the paper's attacker knows the
  architecture and the data, not the victim's weights).
* ``badnets``: Gu, Dolan-Gavitt & Garg 2017 on every frame: a fixed black-and-white checkerboard
  patch in the corner, poisoned labels.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from smoothpurify import SmoothPurifyError
from smoothpurify.registry import Registry
from modalities.contract import Attack

ATTACKS = Registry("video attack")


def stamp(x: torch.Tensor, patch: torch.Tensor, margin: int = 1) -> torch.Tensor:
    """``x [N, C, T, H, W]`` with ``patch`` in the bottom-right corner of every frame (new tensor):
    ``[C, s, s]`` the same in every frame, ``[C, T, s, s]`` one per frame."""
    if x.dim() != 5:
        raise SmoothPurifyError(f"video attacks take clips [N, C, T, H, W], got {list(x.shape)}")
    s, (h, w) = patch.shape[-1], x.shape[-2:]
    if s + margin > min(h, w):
        raise SmoothPurifyError(f"a {s}-pixel patch does not fit frames of {h}x{w}")
    out = x.clone()
    if patch.dim() == 4 and patch.shape[1] != x.shape[2]:
        raise SmoothPurifyError(f"a patch for {patch.shape[1]} frames cannot be stamped on clips of {x.shape[2]}")
    patch = patch.to(x) if patch.dim() == 4 else patch.to(x).unsqueeze(1)
    out[..., h - margin - s:h - margin, w - margin - s:w - margin] = patch
    return out


def patch_mask(shape: tuple[int, ...], size: int, margin: int = 1) -> torch.Tensor:
    """Boolean ``shape`` (one clip ``[C, T, H, W]``) marking the stamped pixels."""
    mask = torch.zeros(shape, dtype=torch.bool)
    h, w = shape[-2:]
    mask[..., h - margin - size:h - margin, w - margin - size:w - margin] = True
    return mask


class PatchAttack(Attack):
    def _size(self) -> int:
        size = int(self.options.get("size", 4))
        if len(self.input_shape) != 4:
            raise SmoothPurifyError(f"{self.name}: inputs must be clips [C, T, H, W], got {list(self.input_shape)}")
        if not 1 <= size < min(self.input_shape[-2:]):
            raise SmoothPurifyError(f"{self.name}: patch size {size} does not fit {list(self.input_shape[-2:])} frames")
        return size

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return stamp(x, self.trigger["patch"])


@ATTACKS.register("badnets")
class BadNetsFrames(PatchAttack):
    """A ``size`` x ``size`` (4) checkerboard of 0 and 1 in every frame; labels set to the target."""

    name = "badnets"

    def make_trigger(self) -> dict[str, torch.Tensor]:
        s = self._size()
        board = ((torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2).float()
        return {"patch": board.expand(self.input_shape[0], s, s).clone()}


def _surrogate(attack: Attack, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any]):
    t = dict(context["train"])
    torch.manual_seed(attack.seed)
    model = context["make_model"]()
    context["train_fn"](model, x, y, context["likelihood"], epochs=int(attack.options.get("surrogate_epochs", 4)),
                        lr=float(t.get("lr", 0.05)), batch_size=int(t.get("batch_size", 64)),
                        momentum=float(t.get("momentum", 0.9)), weight_decay=float(t.get("weight_decay", 5e-4)),
                        seed=attack.seed, device=context.get("device", "cpu"), desc=f"{attack.name} surrogate",
                        progress=bool(context.get("progress", False)))
    model = model.to(context.get("device", "cpu")).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@ATTACKS.register("clean-label")
class CleanLabelVideo(PatchAttack):
    """Zhao et al. 2020 (module docstring). Options: ``size`` (patch side, 6), ``patch_steps`` (200)
    signed-gradient steps of ``patch_lr`` (0.02) on batches of ``patch_batch`` (64) non-target clips;
    ``eps`` (16/255), ``steps`` (10; step eps/4) of the PGD; ``surrogate_epochs`` (4). The PGD
    perturbation exists only for the poisoned training clips; the saved trigger is the patch."""

    name = "clean-label"
    clean_label = True
    fit_trains = "the trigger and the perturbation"   # fit() precomputes the poisoned clips

    def make_trigger(self) -> dict[str, torch.Tensor]:
        s = self._size()
        c, t = self.input_shape[:2]
        shape = (c, t, s, s) if self.options.get("per_frame", True) else (c, s, s)
        return {"patch": torch.rand(shape, generator=self.generator)}

    def _optimise_patch(self, model, x: torch.Tensor, y: torch.Tensor, device: str) -> None:
        pool = torch.nonzero(y != self.target_label).flatten()
        steps, lr = int(self.options.get("patch_steps", 200)), float(self.options.get("patch_lr", 0.02))
        batch = int(self.options.get("patch_batch", 64))
        patch = self.trigger["patch"].clone().to(device)
        gen = torch.Generator().manual_seed(self.seed + 1)
        for _ in range(steps):
            idx = pool[torch.randint(len(pool), (min(batch, len(pool)),), generator=gen)]
            patch.requires_grad_(True)
            out = model(stamp(x[idx].to(device), patch))
            loss = F.cross_entropy(out, torch.full((len(idx),), self.target_label, device=device))
            (g,) = torch.autograd.grad(loss, patch)
            with torch.no_grad():
                patch = (patch - lr * g.sign()).clamp(0, 1)
        self.trigger["patch"] = patch.detach().cpu()

    def fit(self, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any]) -> None:
        device = context.get("device", "cpu")
        surrogate = _surrogate(self, x, y, context)
        self._optimise_patch(surrogate, x, y, device)
        idx = torch.from_numpy(self.choose_poisoned(y.numpy()))
        eps, steps = float(self.options.get("eps", 16 / 255)), int(self.options.get("steps", 10))
        out = []
        for chunk in idx.split(64):
            start, target = x[chunk].to(device), y[chunk].to(device)
            adv = start.clone()
            for _ in range(steps):
                adv.requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(surrogate(adv), target), adv)
                with torch.no_grad():
                    adv = (adv + eps / 4 * g.sign()).clamp(start - eps, start + eps).clamp(0, 1)
            out.append(self.apply(adv.detach()).cpu())
        self.perturbed = (idx, torch.cat(out) if out else x[:0].clone())
