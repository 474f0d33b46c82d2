"""The exception types for bad input from a user (a config, a file, a request) and for failed writes."""

from typing import Any


class UserError(ValueError):
    """Bad input from a user. The CLI prints it as one line (`error: ...`) and exits 2, no traceback.

    The message names the offending thing and value, e.g. "n_embd 100 is not divisible by n_head 12".
    It subclasses ValueError so library callers can catch it the ordinary way.
    """


class WriteError(UserError):
    """A file could not be written (full disk, quota, permissions, read-only file system).

    Raised by the writers in atomic.py after they removed their partial output, so what was on disk
    before the write is intact; training catches it to say which checkpoint that is.
    """


def quote(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut to `limit` characters: a file can hold megabytes where a
    number was expected. A tensor is described by its dtype and shape."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
