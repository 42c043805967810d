"""sift-llm: instruction tuning for LLaMA-class models with Sparse Increment Fine-Tuning (SIFT)."""

__version__ = "0.1.0"
