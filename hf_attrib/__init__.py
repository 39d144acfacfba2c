"""hf-attrib: data attribution for PyTorch and Hugging Face models."""

__version__ = "0.1.0.dev0"
