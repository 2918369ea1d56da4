"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class LorapError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
