"""sftdpo: SFT, DPO, staged SFT->DPO and FFT vs LoRA studies on small decoder language models."""

__version__ = "0.1.0"
