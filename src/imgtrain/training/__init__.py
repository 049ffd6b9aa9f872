"""Train PyTorch Model: the run around the loop (train.py), the loop (loop.py), checkpoints, early stopping."""
