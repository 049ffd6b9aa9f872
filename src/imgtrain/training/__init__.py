"""Train PyTorch Model: the loop, early stopping, seeding."""
