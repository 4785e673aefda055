"""The one exception sftdpo's code raises for its users."""


class SftdpoError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""
