"""Image classifiers and their registry: ``create_model(name, num_classes, in_channels, image_size)``.

Every model declares ``classifier_name`` (its last linear layer); the core finds penultimate
features as that layer's input (``smoothpurify.model``), so no model needs extra methods.
PreActResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks") and WRN-16-1
(Zagoruyko & Komodakis 2016) are our own, as in both papers; ResNet-34/50 and ViT-S come from
torchvision/timm and are imported lazily (they need :mod:`modalities.image.torchvision_compat`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.registry import Registry


class SmallCNN(nn.Module):
    """The CPU default: four 3x3 conv layers with batch norm, two poolings, two linear layers."""

    classifier_name = "fc2"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.fc1 = nn.Linear(2 * w * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class PreActResNet18(nn.Module):
    classifier_name = "linear"

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)


class WideBasic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


class WideResNet(nn.Module):
    """WRN-depth-k; WRN-16-1 has (16 - 4) / 6 = 2 blocks per group and widths 16/16/32/64."""

    classifier_name = "fc"

    def __init__(self, depth: int = 16, widen: int = 1, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32):
        super().__init__()
        if (depth - 4) % 6:
            raise SmoothPurifyError(f"WideResNet depth must be 6n+4, got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            groups.append(nn.Sequential(*[WideBasic(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                          for i in range(n)]))
            cin = cout
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1))


def _torchvision_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        from modalities.image.torchvision_compat import import_torchvision  # noqa: PLC0415

        tv = import_torchvision()
        model = getattr(tv.models, f"resnet{depth}")(num_classes=num_classes)
        if in_channels != 3 or image_size <= 64:
            # Small images: a 3x3 stem without max-pool, as is usual for CIFAR-scale inputs.
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        model.classifier_name = "fc"
        return model
    return build


def _timm_vit_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from modalities.image.torchvision_compat import import_torchvision  # noqa: PLC0415

    import_torchvision()  # timm imports torchvision; the compatibility fix must come first
    try:
        import timm  # noqa: PLC0415
    except ImportError:
        raise SmoothPurifyError("vit_s needs timm: pip install 'smoothpurify[vision]'") from None
    patch = 4 if image_size <= 64 else 16
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=num_classes,
                              img_size=image_size, patch_size=patch, in_chans=in_channels)
    model.classifier_name = "head"
    return model


MODELS = Registry("model", {
    "small_cnn": lambda num_classes, in_channels, image_size: SmallCNN(num_classes, in_channels, image_size),
    "preact_resnet18": lambda num_classes, in_channels, image_size: PreActResNet18(num_classes, in_channels, image_size),
    "wrn16_1": lambda num_classes, in_channels, image_size: WideResNet(16, 1, num_classes, in_channels, image_size),
    "resnet34": _torchvision_resnet(34),
    "resnet50": _torchvision_resnet(50),
    "vit_s": _timm_vit_small,
}, descriptions={
    "small_cnn": "two conv blocks + MLP, seconds per epoch on a CPU (tests, quick checks)",
    "preact_resnet18": "PreAct ResNet-18 (He et al. 2016), the SFT paper's CIFAR-10 model",
    "wrn16_1": "WideResNet-16-1 (Zagoruyko & Komodakis 2016), the SFT paper's GTSRB model; smoke default",
    "resnet34": "torchvision ResNet-34 (3x3 stem for small images)",
    "resnet50": "torchvision ResNet-50 (3x3 stem for small images)",
    "vit_s": "timm ViT-S (patch 4 for small images); needs the vision extra",
})


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    factory = MODELS.get_or_raise(name)
    if num_classes < 2:
        raise SmoothPurifyError(f"num_classes must be at least 2, got {num_classes}")
    return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
