"""The one exception type that the CLI reports as a single line, without a traceback."""


class KanimgError(Exception):
    """A problem with the user's input or environment that they can fix (bad file, bad flag)."""
