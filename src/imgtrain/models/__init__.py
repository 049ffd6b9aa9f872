"""The architecture registry (DenseNet, ResNet) and the modules that make untrained models."""
