"""Image backdoor attacks, selectable by name (params.yaml ``image.attack.name``, CLI ``--attack``)."""
from __future__ import annotations

from typing import Any

from modalities.base import Attack, build_attack
from modalities.image.attacks.patch import BadNets, Trojan
from modalities.image.attacks.blend import SIG, Blend

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blend, Trojan, SIG)}


def create_attack(name: str, **kwargs: Any) -> Attack:
    return build_attack(ATTACKS, name, **kwargs)
