"""Make the registry's CUDA-built torchvision importable on CPU-only torch.

The torchvision wheel on PyPI is built against CUDA torch; with the CPU torch build its compiled
operators fail to register and ``import torchvision`` dies with ``operator torchvision::nms does not
exist`` (DEPENDENCIES.md). Only when that happens, we define ``torchvision::nms`` (and ``qnms``)
with a pure-PyTorch NMS through ``torch.library`` and disable the ops assertion, before torchvision
(and timm / torchmetrics, which import it) is first imported. Nothing is patched when the compiled
ops load (a CUDA cluster).
"""
from __future__ import annotations

import importlib
import sys

import torch

from smoothpurify import SmoothPurifyError

_PATCHED = False


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, boxes as (x1, y1, x2, y2); indices sorted by score."""
    order = scores.argsort(descending=True)
    keep = []
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _register_fallback_ops() -> None:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms_reference, "CompositeExplicitAutograd")
    lib.impl("qnms", nms_reference, "CompositeExplicitAutograd")
    _register_fallback_ops.lib = lib  # keep the Library alive for the process


def import_torchvision():
    """Import torchvision, applying the CPU fallback only if its compiled operators are missing."""
    global _PATCHED
    if "torchvision" in sys.modules and not _PATCHED:
        return sys.modules["torchvision"]
    try:
        import torchvision  # noqa: PLC0415
        return torchvision
    except ImportError as err:
        raise SmoothPurifyError("this model needs torchvision: pip install 'smoothpurify[vision]'") from err
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _register_fallback_ops()
    _PATCHED = True
    boxes = importlib.import_module("torchvision.ops.boxes")
    boxes._assert_has_ops = lambda: None
    import torchvision  # noqa: PLC0415
    if "torchvision.transforms.functional_tensor" not in sys.modules:
        # pytorchvideo imports a module torchvision removed; alias it to its new name.
        sys.modules["torchvision.transforms.functional_tensor"] = importlib.import_module(
            "torchvision.transforms._functional_tensor")
    return torchvision
