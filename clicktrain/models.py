"""CIFAR-style model definitions adapted to any input channels, size and class count."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

VGG_CONFIGS = {
    "vgg_small": [16, 32, "M", 64, 64, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, config, in_channels: int = 1, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers, c = [], in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = max(8, int(v * width))
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, sec. 4.2): depth = 6n + 2, widths 16/32/64 (x width)."""

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [max(8, int(w * width)) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, c = [], widths[0]
        for stage, w in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(c, w, 2 if stage > 0 and i == 0 else 1))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    if name in VGG_CONFIGS:
        return VGG(VGG_CONFIGS[name], in_channels, num_classes, width)
    if name.startswith("resnet") and name[6:].isdigit():
        return ResNet(int(name[6:]), in_channels, num_classes, width)
    raise ConfigError(f"unknown model {name!r}; choose one of {sorted(VGG_CONFIGS) + ['resnet20', 'resnet32']}")
