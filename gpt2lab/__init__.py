"""gpt2lab: GPT-2 built and trained from scratch in PyTorch.

`from gpt2lab import GPT, GPTConfig, get_tokenizer` works; each is imported on first use, so that
importing a light module (the tokenizer in a data worker process) does not pay for torch.
"""

from typing import TYPE_CHECKING, Any

__all__ = ["GPT", "GPTConfig", "get_tokenizer"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from gpt2lab.config import GPTConfig
    from gpt2lab.model import GPT
    from gpt2lab.tokenizer import get_tokenizer

_LAZY = {"GPT": "gpt2lab.model", "GPTConfig": "gpt2lab.config", "get_tokenizer": "gpt2lab.tokenizer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
