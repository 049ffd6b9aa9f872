"""Early stopping on validation loss, compared with the best so far (not the previous epoch)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EarlyStopping:
    patience: int
    best_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0

    def update(self, epoch: int, validation_loss: float) -> bool:
        """Record an epoch's loss; return True when it is the best so far."""
        if validation_loss < self.best_loss:  # NaN never improves
            self.best_loss, self.best_epoch = validation_loss, epoch
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.epochs_without_improvement >= self.patience
