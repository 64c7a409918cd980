"""Small models covering the conv forms clicktrain must handle (shared by several tests)."""

import torch
import torch.nn.functional as F
from torch import nn

from clicktrain.models import ResNet, build_model


class FunctionalNet(nn.Module):
    """Convs as F.conv2d on raw parameters, one weight used twice, a stride-2 3x3."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.w1 = nn.Parameter(torch.randn(12, 8, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.randn(12) * 0.1)
        self.shared = nn.Parameter(torch.randn(12, 12, 3, 3) * 0.2)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.stem, padding=1))
        x = F.relu(F.conv2d(x, self.w1, self.b1, stride=2, padding=1))
        x = F.relu(F.conv2d(x, self.shared, padding=1))
        x = F.relu(torch.conv2d(x, self.shared, None, 1, 1))
        return self.head(x.mean((2, 3)))


class BranchNet(nn.Module):
    """Two 3x3 branches concatenated (channel count doubles), then a 3x3 on the concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.merge = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        return self.fc(F.relu(self.merge(x)).amax((2, 3)))


class MixedNet(nn.Module):
    """Convs that must stay dense next to odd prunable ones."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(3, 8, 5, padding=2)                      # 5x5: dense
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)        # grouped: dense
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)      # depthwise: dense
        self.dilated = nn.Conv2d(8, 16, 3, padding=2, dilation=2)     # prunable
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")  # prunable
        self.strided = nn.Conv2d(16, 16, 3, stride=2)                 # prunable, no padding
        self.pointwise = nn.Conv2d(16, 10, 1)                         # 1x1: dense

    def forward(self, x):
        for conv in (self.big, self.grouped, self.depthwise, self.dilated, self.reflect, self.strided):
            x = F.relu(conv(x))
        return self.pointwise(x).mean((2, 3))


def zoo():
    """name -> (model factory, example input); inputs have odd sizes on purpose."""
    return {
        "vgg": (lambda: build_model("vgg_small", in_channels=3, num_classes=5), torch.randn(3, 3, 15, 15)),
        "resnet": (lambda: ResNet(8, in_channels=3, num_classes=5), torch.randn(3, 3, 16, 16)),
        "functional": (FunctionalNet, torch.randn(3, 3, 13, 13)),
        "branches": (BranchNet, torch.randn(3, 3, 12, 12)),
        "mixed": (MixedNet, torch.randn(3, 3, 17, 17)),
    }
