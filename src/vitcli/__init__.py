"""vitcli: train, evaluate, predict with and look inside Vision Transformers."""

__version__ = "0.1.0"
