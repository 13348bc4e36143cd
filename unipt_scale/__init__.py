"""unipt_scale: UniPT side-network tuning of large frozen backbones."""
__version__ = "0.1.0"
