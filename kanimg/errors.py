"""The one exception type that the CLI reports as a single line, without a traceback."""


class KanimgError(Exception):
    """A problem with the user's input or environment that they can fix (bad file, bad flag)."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type when empty), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
