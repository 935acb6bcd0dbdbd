"""amllm: LLaMA pretraining on C4 with the Adaptive Memory optimizers (AM-AdamW, AM-SGD)."""

__version__ = "0.1.0"
