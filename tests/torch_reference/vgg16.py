"""torchvision's VGG16 `features` (config "D"), for the `lpips` package in tests.

torchvision does not import beside the CPU PyTorch wheel CI installs ("operator torchvision::nms
does not exist"), and `lpips` imports `torchvision.models` at import time. `torchvision_stand_in()`
gives `lpips` a module whose `models.vgg16(pretrained=False)` has torchvision's `features`
Sequential, index for index (conv 3x3 pad 1, ReLU(inplace=True), MaxPool2d(2, 2)), so its
state-dict keys are those of torchvision's checkpoint (`features.0.weight`, ...).
"""

from __future__ import annotations

import types

import torch

VGG16_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features() -> torch.nn.Sequential:
    layers, channels = [], 3
    for item in VGG16_D:
        if item == "M":
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [torch.nn.Conv2d(channels, item, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
            channels = item
    return torch.nn.Sequential(*layers)


def torchvision_stand_in() -> types.ModuleType:
    def vgg16(pretrained: bool = False, **_):
        if pretrained:
            raise RuntimeError("the stand-in has no ImageNet weights; build LPIPS with pnet_rand=True")
        return types.SimpleNamespace(features=vgg16_features())

    module = types.ModuleType("torchvision")
    module.models = types.SimpleNamespace(vgg16=vgg16)
    return module
