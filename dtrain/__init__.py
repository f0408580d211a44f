"""dtrain: a distributed multi-GPU trainer for CIFAR-class image classification."""

__version__ = "0.1.0"
