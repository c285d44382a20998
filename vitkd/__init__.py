"""vitkd: head-specific attention distillation for Vision Transformers."""

__version__ = "0.1.0"
