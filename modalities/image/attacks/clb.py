"""Label-consistent (clean-label) backdoor."""
from __future__ import annotations

from typing import Any

import torch

from smoothpurify import SmoothPurifyError
from modalities.image.attacks.nets import pgd, seeded
from modalities.image.attacks.patch import StampAttack


class CLB(StampAttack):
    """CLB (Turner, Tsipras & Madry 2018/2019, "Label-Consistent Backdoor Attacks", arXiv:1912.02771).

    Clean-label: only target-class training samples are poisoned and their labels stay correct.
    To make the model rely on the trigger, each chosen sample is first made hard to classify by an
    adversarial perturbation (L_inf PGD, ``eps`` 8/255, ``steps`` 10, random start) against a
    surrogate trained on the clean data in :meth:`fit` (``surrogate_epochs``, default 2, of the run's
    own architecture; the paper uses an adversarially trained surrogate, a plain one is the cheaper
    variant), then a 3x3 checkerboard is stamped in all four corners (the paper's four-corner
    trigger survives flips). The perturbation exists only for training samples, held in memory; the
    saved, test-time trigger is the corner checkerboards alone.

    Options: ``eps``, ``steps``, ``surrogate_epochs``, ``size`` (3), ``margin`` (1), ``amplitude``
    (1.0: full-contrast patch; the paper's reduced-visibility variant uses smaller values, the
    patch then becomes ``0.5 + amplitude * (checker - 0.5)``).
    """

    name = "clb"
    clean_label = True

    def make_trigger(self) -> dict[str, torch.Tensor]:
        c, h, w = self.input_shape
        size, margin = int(self.options.get("size", 3)), int(self.options.get("margin", 1))
        amp = float(self.options.get("amplitude", 1.0))
        checker = ((torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 == 0).float()
        checker = 0.5 + amp * (checker - 0.5)
        mask, pattern = torch.zeros(c, h, w), torch.zeros(c, h, w)
        for r0 in (margin, h - margin - size):
            for c0 in (margin, w - margin - size):
                mask[:, r0:r0 + size, c0:c0 + size] = 1.0
                pattern[:, r0:r0 + size, c0:c0 + size] = checker
        return {"mask": mask, "pattern": pattern}

    @property
    def eps(self) -> float:
        return float(self.options.get("eps", 8 / 255))

    def fit(self, x: torch.Tensor, y: torch.Tensor, context: dict[str, Any]) -> None:
        idx = torch.from_numpy(self.choose_poisoned(y.numpy()))
        t = dict(context["train"])
        with seeded(self.seed):
            surrogate = context["make_model"]()
        context["train_fn"](surrogate, x, y, context["likelihood"],
                            epochs=int(self.options.get("surrogate_epochs", 2)), lr=float(t.get("lr", 0.05)),
                            batch_size=int(t.get("batch_size", 128)), momentum=float(t.get("momentum", 0.9)),
                            weight_decay=float(t.get("weight_decay", 5e-4)), seed=self.seed,
                            device=context.get("device", "cpu"), desc="clb surrogate",
                            progress=bool(context.get("progress", False)))
        self.perturbed = (idx, self.perturb(surrogate, x[idx], y[idx], context.get("device", "cpu")))

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu",
                batch: int = 256) -> torch.Tensor:
        """Untargeted PGD on the true labels: the sample stays in its class but looks unlike it."""
        model.to(device).eval()
        steps = int(self.options.get("steps", 10))
        out = [pgd(model, xb.to(device), yb.to(device), self.eps, steps, gen=self.generator).cpu()
               for xb, yb in zip(x.split(batch), y.split(batch))]
        return torch.cat(out) if out else x.clone()

    def poison_training_set(self, x: torch.Tensor, y: torch.Tensor, batch: int = 4096):
        idx = torch.from_numpy(self.choose_poisoned(y.numpy()))
        done = getattr(self, "perturbed", None)
        if done is None or not torch.equal(done[0], idx):
            raise SmoothPurifyError("clb: call fit() on this training set first (it trains the surrogate "
                                    "for the adversarial perturbation)")
        x = x.clone()
        x[idx] = self.apply(done[1])
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[idx] = True
        return x, y.clone(), mask
