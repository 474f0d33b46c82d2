"""gpt2lab: GPT-2 built and trained from scratch in PyTorch."""

from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT

__all__ = ["GPT", "GPTConfig"]
__version__ = "0.1.0"
