"""Read CIFAR-10 ``-py`` batches without executing arbitrary pickle code.

The official python batches are pickled dicts of bytes, lists and one numpy array. A restricted
unpickler resolves only the few numpy globals that such a file needs and refuses everything else,
so a crafted file cannot run code. (The ``-bin`` layout needs none of this and is preferred.)
"""
from __future__ import annotations

import pickle
from pathlib import Path

from smoothpurify import SmoothPurifyError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = _CifarUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise SmoothPurifyError(f"CIFAR-10 batch missing: {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise SmoothPurifyError(f"{path} is not a CIFAR-10 python batch ({err})") from None
    if not isinstance(raw, dict):
        raise SmoothPurifyError(f"{path} is not a CIFAR-10 python batch")
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    if "data" not in batch or "labels" not in batch:
        raise SmoothPurifyError(f"{path} lacks 'data'/'labels'")
    return batch
