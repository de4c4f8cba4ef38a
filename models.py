"""The three digit classifiers and the registry that builds them by name.

Every model takes a normalized batch [B, 1, 28, 28] and returns logits [B, 10].
`python models.py` prints the parameter count of each (the README table comes from it).
"""
import torch
from torch import nn


def conv_bn(in_channels, out_channels, activation, stride=1):
    """3x3 convolution (same padding) -> BatchNorm -> activation; bias is redundant before BN."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        activation(),
    )


class VGG(nn.Module):
    """Pipeline A's VGG-style CNN: two conv pairs with pooling, one wide conv, an MLP head."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 32, nn.GELU), conv_bn(32, 32, nn.GELU),
            nn.MaxPool2d(2), nn.Dropout2d(0.2),              # 32x14x14
            conv_bn(32, 64, nn.GELU), conv_bn(64, 64, nn.GELU),
            nn.MaxPool2d(2), nn.Dropout2d(0.25),             # 64x7x7
            conv_bn(64, 128, nn.GELU), nn.Dropout2d(0.3),    # 128x7x7, no pooling
        )
        self.head = nn.Sequential(
            nn.Flatten(),                                    # 6272
            nn.Linear(128 * 7 * 7, 512, bias=False), nn.BatchNorm1d(512), nn.GELU(), nn.Dropout(0.35),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


class ResidualBlock(nn.Module):
    """Two 3x3 convs with BN; the shortcut is identity, or 1x1 conv + BN when the shape changes."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Compact ResNet: 3 stages of 2 residual blocks, 28x28 -> 14x14 -> 7x7, global average pool."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(1, 32, nn.ReLU)                                       # 32x28x28
        self.layer1 = nn.Sequential(ResidualBlock(32, 64), ResidualBlock(64, 64))  # 64x28x28
        self.layer2 = nn.Sequential(ResidualBlock(64, 128, 2), ResidualBlock(128, 128))   # 128x14x14
        self.layer3 = nn.Sequential(ResidualBlock(128, 256, 2), ResidualBlock(256, 256))  # 256x7x7
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),           # 256
            nn.Dropout(0.4), nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class WideCNN(nn.Module):
    """Three wide conv blocks (64, 128, 256 channels) with pooling, and an MLP head."""

    def __init__(self, num_classes=10):
        super().__init__()

        def block(in_channels, out_channels, pool_padding=0):
            return nn.Sequential(
                conv_bn(in_channels, out_channels, nn.ReLU), conv_bn(out_channels, out_channels, nn.ReLU),
                nn.MaxPool2d(2, padding=pool_padding), nn.Dropout(0.25),
            )

        self.features = nn.Sequential(
            block(1, 64),                     # 64x14x14
            block(64, 128),                   # 128x7x7
            block(128, 256, pool_padding=1),  # 256x4x4: the padded pool keeps the 7th row and column
        )
        self.head = nn.Sequential(
            nn.Flatten(),                     # 4096
            nn.Linear(256 * 4 * 4, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


MODELS = {"vgg": VGG, "resnet": ResNet, "widecnn": WideCNN}


def build_model(name):
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    print("| architecture | parameters |\n|---|---:|")
    for name in MODELS:
        print(f"| `{name}` | {count_parameters(build_model(name)):,} |")
