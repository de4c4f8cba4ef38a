"""The three digit classifiers, the registry that builds them by name, and the line reader the released model
carries for --number (LineReader: which digits a line of writing holds, and where).

Every classifier takes a normalized batch [B, 1, 28, 28] and returns logits [B, 10].
`python models.py` prints the parameter count of each (the README table comes from it).
"""
import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(in_channels, out_channels, activation, stride=1):
    """3x3 convolution (same padding) -> BatchNorm -> activation; bias is redundant before BN."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        activation(),
    )


class PackedDropout(nn.Module):
    """nn.Dropout(p) with a packed mask: each element is kept with probability 1 - p and scaled to keep the mean.

    nn.Dropout draws one random number per element (bernoulli_), serially on the CPU, a visible share of a training
    step (README, Speed). Here, on the CPU, one 64-bit draw gives four 16-bit ones, so the mask costs a quarter of
    the draws. p is rounded to a multiple of 1/65536 (0.25 and 0.5 exactly, 0.35 and 0.4 within 1e-5), and the
    scale uses the rounded value, so the expected output is still x.
    """

    def __init__(self, p):
        super().__init__()
        self.drop_count = round(p * 65536)  # of the 65536 values an int16 takes, this many drop the element
        self.p = self.drop_count / 65536

    def forward(self, x):
        if not self.training or self.drop_count == 0:
            return x
        if x.device.type != "cpu":  # GPUs draw the mask in a fused kernel; MPS's 64-bit random integers are less proven
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        layout = torch.empty_like(x, dtype=torch.int16)  # x's shape and dense memory layout, e.g. channels_last
        bits = words.view(torch.int16)[:n].as_strided(x.shape, layout.stride())
        keep = bits >= self.drop_count - 32768          # an int16 runs from -32768 to 32767
        return x * keep * (1 / (1 - self.p))

    def extra_repr(self):
        return f"p={self.p}"


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
            nn.Linear(128 * 7 * 7, 512, bias=False), nn.BatchNorm1d(512), nn.GELU(), PackedDropout(0.35),
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


class GlobalAveragePool(nn.Module):
    """The mean over height and width, [B, C, H, W] -> [B, C, 1, 1]: nn.AdaptiveAvgPool2d(1), whose CUDA backward
    has no deterministic version, while a mean's has."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


class ResNet(nn.Module):
    """Compact ResNet: 3 stages of 2 residual blocks, 28x28 -> 14x14 -> 7x7, global average pool."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(1, 32, nn.ReLU)                                       # 32x28x28
        self.layer1 = nn.Sequential(ResidualBlock(32, 64), ResidualBlock(64, 64))  # 64x28x28
        self.layer2 = nn.Sequential(ResidualBlock(64, 128, 2), ResidualBlock(128, 128))   # 128x14x14
        self.layer3 = nn.Sequential(ResidualBlock(128, 256, 2), ResidualBlock(256, 256))  # 256x7x7
        self.head = nn.Sequential(
            GlobalAveragePool(), nn.Flatten(),               # 256
            PackedDropout(0.4), nn.Linear(256, num_classes),
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
                nn.MaxPool2d(2, padding=pool_padding), PackedDropout(0.25),
            )

        self.features = nn.Sequential(
            block(1, 64),                     # 64x14x14
            block(64, 128),                   # 128x7x7
            block(128, 256, pool_padding=1),  # 256x4x4: the padded pool keeps the 7th row and column
        )
        self.head = nn.Sequential(
            nn.Flatten(),                     # 4096
            nn.Linear(256 * 4 * 4, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), PackedDropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


class LineReader(nn.Module):
    """A line of handwritten digits -> the logits of each column of frames [B, T, 11] (class 0 is CTC's blank, k + 1
    the digit k) from the line's ink, float [B, 1, HEIGHT, W] in 0..1 at a fixed height, one frame per STRIDE columns
    (T = W // STRIDE).

    The CRNN of Shi, Bai and Yao (2015), narrow for ten classes: a convolutional trunk that halves the height four
    times and the width twice, then a bidirectional GRU over the columns, trained with CTC (train_reader.py). It
    decides where the digits are; `--number` reads each line of writing with it (photos.read_line).
    """
    HEIGHT, STRIDE, CLASSES = 32, 4, 11

    def __init__(self, width=16, hidden=64):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, width, nn.ReLU), nn.MaxPool2d(2),                                          # 16 x 16 x W/2
            conv_bn(width, 2 * width, nn.ReLU), nn.MaxPool2d(2),                                  # 32 x 8 x W/4
            conv_bn(2 * width, 4 * width, nn.ReLU), conv_bn(4 * width, 4 * width, nn.ReLU),
            nn.MaxPool2d((2, 1)),                                                                 # 64 x 4 x W/4
            conv_bn(4 * width, 4 * width, nn.ReLU), nn.MaxPool2d((2, 1)),                          # 64 x 2 x W/4
        )
        self.sequence = nn.GRU(4 * width * 2, hidden, batch_first=True, bidirectional=True)
        self.classes = nn.Linear(2 * hidden, self.CLASSES)

    def forward(self, x):
        features = self.features(x)                          # [B, C, 2, T]
        columns = features.flatten(1, 2).transpose(1, 2)     # [B, T, 2C]
        return self.classes(self.sequence(columns)[0])       # [B, T, 11]

    @staticmethod
    def decode(logits, widths):
        """Greedy CTC decoding of logits [B, T, 11] for lines `widths` [B] px wide: for each line, its digits as
        (digit, first frame, last frame), left to right; a digit's frames are the run of frames that said it."""
        best = logits.argmax(-1)                                             # [B, T]
        read = []
        for classes, width in zip(best.tolist(), widths.tolist(), strict=True):
            digits, previous = [], 0
            for frame, label in enumerate(classes[:max(1, width // LineReader.STRIDE)]):
                if label and label == previous:
                    digits[-1] = (digits[-1][0], digits[-1][1], frame)
                elif label:
                    digits.append((label - 1, frame, frame))
                previous = label
            read.append(digits)
        return read


LINE_READER = "line-reader"  # a checkpoint's arch when it is a LineReader (train_reader.py), not a classifier
MODELS = {"vgg": VGG, "resnet": ResNet, "widecnn": WideCNN}
# A fixed number per architecture, part of each k-fold job's seed: a new architecture takes the next one.
ARCH_NUMBERS = {"vgg": 0, "resnet": 1, "widecnn": 2}


def build_model(name):
    """A fresh model of architecture `name` (a key of MODELS; names from users are checked where they are read)."""
    return MODELS[name]()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    print("| architecture | parameters |\n|---|---:|")
    for name in MODELS:
        print(f"| `{name}` | {count_parameters(build_model(name)):,} |")
