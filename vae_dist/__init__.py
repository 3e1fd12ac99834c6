"""Variational autoencoders trained with Accelerate and exported to ONNX."""

__version__ = "0.1.0"
