"""ResNet-18 for 2D and 3D inputs in plain torch: one dimension-generic implementation (MONAI style).

As in the MedMNIST v2 baselines (Yang et al. 2023): 28-size inputs get a CIFAR-style stem (3x3
stride-1 conv, no max-pool); larger inputs the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2
max-pool). BatchNorm + ReLU, BasicBlocks [2, 2, 2, 2] of widths 64-128-256-512, global average
pool, one linear layer to the task's outputs. PyTorch's default initialisation, like the paper's code.
"""

import torch
from torch import nn

LAYERS = {  # spatial_dims -> (conv, norm, max-pool, global average pool)
    2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d),
}
WIDTHS = (64, 128, 256, 512)
BLOCKS = (2, 2, 2, 2)
SMALL_INPUT = 32  # inputs at most this many pixels a side (MedMNIST's 28) get the CIFAR-style stem


def layers(spatial_dims: int):
    if spatial_dims not in LAYERS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return LAYERS[spatial_dims]


class BasicBlock(nn.Module):
    """conv3-BN-ReLU-conv3-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        conv, norm, _, _ = layers(spatial_dims)
        self.conv1 = conv(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = conv(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(conv(in_channels, channels, 1, stride=stride, bias=False), norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C_in, *S] -> [B, C, *S / stride]"""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """`ResNet18(spatial_dims, in_channels, num_outputs, small_input)(x: [B, C, *S]) -> logits [B, num_outputs]`.

    small_input: True gives the CIFAR-style stem (for 28-size MedMNIST), False the ImageNet stem.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_outputs: int, small_input: bool = True):
        super().__init__()
        conv, norm, max_pool, avg_pool = layers(spatial_dims)
        if small_input:
            self.stem = nn.Sequential(conv(in_channels, WIDTHS[0], 3, stride=1, padding=1, bias=False),
                                      norm(WIDTHS[0]), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(conv(in_channels, WIDTHS[0], 7, stride=2, padding=3, bias=False),
                                      norm(WIDTHS[0]), nn.ReLU(inplace=True), max_pool(3, stride=2, padding=1))
        stages, channels = [], WIDTHS[0]
        for i, (width, blocks) in enumerate(zip(WIDTHS, BLOCKS)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(spatial_dims, channels, width, stride)]
            stage += [BasicBlock(spatial_dims, width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = avg_pool(1)
        self.head = nn.Linear(WIDTHS[-1], num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, *S] -> logits [B, num_outputs]"""
        features = self.stages(self.stem(x))  # [B, 512, *S / 8] (small input) or [B, 512, *S / 32]
        return self.head(self.pool(features).flatten(1))  # [B, 512] -> [B, num_outputs]


def resnet18_for(spatial_dims: int, in_channels: int, num_outputs: int, size: tuple[int, ...]) -> ResNet18:
    """The MedMNIST v2 ResNet-18 for inputs of spatial `size`: CIFAR-style stem up to 32 a side."""
    return ResNet18(spatial_dims, in_channels, num_outputs, small_input=max(size) <= SMALL_INPUT)
