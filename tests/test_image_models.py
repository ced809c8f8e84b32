"""The model registry and the uniform classifier / penultimate-feature contract."""
from __future__ import annotations

import pytest
import torch

from modalities.image.models import MODELS, create_model
from smoothpurify import SmoothPurifyError
from smoothpurify.model import get_classifier, penultimate_features


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18", "wrn16_1"])
def test_own_models_expose_classifier_and_features(name):
    model = create_model(name, num_classes=7, in_channels=3, image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    logits = model(x)
    feats = penultimate_features(model, x)
    head = get_classifier(model)
    assert logits.shape == (2, 7) and isinstance(head, torch.nn.Linear)
    assert torch.allclose(head(feats), logits, atol=1e-6)


def test_torchvision_and_timm_models_through_compat_layer():
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed")
    from modalities.image.torchvision_compat import import_torchvision

    torchvision = import_torchvision()  # must come before any plain `import torchvision`
    for name in ("resnet34", "vit_s"):
        model = create_model(name, num_classes=4, in_channels=1, image_size=32).eval()
        x = torch.rand(1, 1, 32, 32)
        assert torch.allclose(get_classifier(model)(penultimate_features(model, x)), model(x), atol=1e-5)
    keep = torchvision.ops.nms(torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.]]),
                               torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]


def test_registry_errors():
    with pytest.raises(SmoothPurifyError, match="unknown model 'resnet9'"):
        create_model("resnet9", 10)
    with pytest.raises(SmoothPurifyError, match="at least 2"):
        create_model("small_cnn", 1)
    assert {"small_cnn", "preact_resnet18", "wrn16_1", "resnet34", "resnet50", "vit_s"} <= set(MODELS)
