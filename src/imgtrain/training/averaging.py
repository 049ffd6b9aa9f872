"""Weight averaging (`--ema`, on by default): the network evaluated after each epoch, and kept as the model, is an
exponential moving average of the weights training has visited.

At the learning rates that train fast, each step overshoots: the weights bounce across the valley they descend,
and the network at the end of an epoch is one sample of that bounce. Their recent average lies nearer the
valley's floor (Polyak averaging; timm's ModelEmaV3, the EMA of most fast recipes), so a model evaluated early is
as good as one trained for longer: see bench/README, "Time to accuracy", for what it buys on each set.

The average's window grows with the run: after n steps the decay is (1 + n) / (WINDOW + n), so that it averages
over about the last 1/(WINDOW - 1) of the steps so far (the first step's weights are forgotten at once, and a short
run of a few dozen steps is averaged over a few steps), up to MAX_DECAY. It moves every EVERY steps, where the
weights are (the GPU's or the CPU's), as one `foreach` lerp over every parameter (a pass over memory: 2 to 4 ms
for ResNet-18 on this 2-core CPU, 4 to 8% of a step on 32 px images when done every step; about 1% so).

BatchNorm's running statistics are not averaged: before each evaluation, precise BatchNorm computes the averaged
weights' own (loop.recompute_batchnorm), starting from the training network's, which it keeps when too few images
reach it. Training goes on from the raw weights; the checkpoint holds both, and the count of updates, so that a
resumed run averages exactly as the uninterrupted one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

WINDOW = 10.0  # the decay after n steps: (1 + n) / (WINDOW + n)
MAX_DECAY = 0.9999
EVERY = 4  # steps between moves of the average


class WeightAverage:
    """An exponential moving average of ``network``'s parameters, held in a copy of it (``.network``).

    The average moves every EVERY steps, by the decays of those steps together, and at the end of each epoch
    (``flush``, before it is evaluated and checkpointed): the weights of the steps between count as the
    latest of them, which at a window of dozens of steps changes nothing measurable and costs a quarter."""

    def __init__(self, network: nn.Module) -> None:
        self.network = copy.deepcopy(network).requires_grad_(False)
        self.updates = 0  # optimiser steps averaged
        self._kept = 1.0  # the share of the average kept over the steps since it last moved
        self._averaged = list(self.network.parameters())
        self._trained = list(network.parameters())

    def decay(self) -> float:
        """The weight of the average so far at the next step."""
        return min(MAX_DECAY, (1 + self.updates) / (WINDOW + self.updates))

    def update(self) -> None:
        """After an optimiser step."""
        self._kept *= self.decay()
        self.updates += 1
        if self.updates % EVERY == 0:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Move the average to where the steps since it last moved have taken it."""
        if self._kept < 1.0:
            torch._foreach_lerp_(self._averaged, [p.detach() for p in self._trained], 1.0 - self._kept)
            self._kept = 1.0

    @torch.no_grad()
    def take_buffers(self, network: nn.Module) -> None:
        """The trained network's buffers (BatchNorm's running statistics) as the average's, before evaluating."""
        for mine, theirs in zip(self.network.buffers(), network.buffers(), strict=True):
            mine.copy_(theirs)
