"""The one exception type for bad input from a user (a config, a file, a request)."""


class UserError(ValueError):
    """Bad input from a user. The CLI prints it as one line (`error: ...`) and exits 2, no traceback.

    The message names the offending thing and value, e.g. "n_embd 100 is not divisible by n_head 12".
    It subclasses ValueError so library callers can catch it the ordinary way.
    """
