"""The train stage: one DeepSpeed loop for SIFT, full fine-tuning and LoRA."""
