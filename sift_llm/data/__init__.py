"""The data stage: instruction and chat corpora become tokenized, prompt-masked training sets on disk."""

from sift_llm.data.config import DataConfig
from sift_llm.data.stage import PreparedData, load_prepared, prepare

__all__ = ["DataConfig", "PreparedData", "load_prepared", "prepare"]
