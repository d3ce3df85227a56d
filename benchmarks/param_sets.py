"""Parameter sets the benchmarks time: ResNet-18's shapes and a many-small-tensors set."""

from __future__ import annotations

import random


def resnet18_shapes() -> list[tuple[int, ...]]:
    """ResNet-18's parameter shapes: 62 tensors, 11,689,512 parameters."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    channels_in = 64
    for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = channels_in if block == 0 else channels
            shapes += [(channels, first_in, 3, 3), (channels,), (channels,)]
            shapes += [(channels, channels, 3, 3), (channels,), (channels,)]
            if block == 0 and (stride != 1 or channels_in != channels):
                shapes += [(channels, channels_in, 1, 1), (channels,), (channels,)]
        channels_in = channels
    return [*shapes, (1000, 512), (1000,)]


def small_shapes(count: int = 600) -> list[tuple[int, ...]]:
    """``count`` 1-d tensors of 1k-10k elements (a fixed draw)."""
    rng = random.Random(0)
    return [(rng.randint(1000, 10000),) for _ in range(count)]
