"""HERO: fine-tune text-to-image diffusion models from online human feedback (arXiv 2410.05116)."""

__version__ = "0.1.0"
