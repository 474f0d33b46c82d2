"""gpt2lab: GPT-2 built and trained from scratch in PyTorch."""

from typing import TYPE_CHECKING, Any

from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT

__all__ = ["GPT", "GPTConfig", "get_tokenizer"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from gpt2lab.tokenizer import Tokenizer


def get_tokenizer(spec: Any, **kwargs: Any) -> "Tokenizer":
    """gpt2lab.tokenizer.get_tokenizer, imported on first use so `import gpt2lab` stays light."""
    from gpt2lab.tokenizer import get_tokenizer as _get_tokenizer

    return _get_tokenizer(spec, **kwargs)
