"""The one exception type the command line turns into a single clear line and a non-zero exit."""


class ConversionError(Exception):
    """A problem the user can fix: bad input, bad flags, an unsupported model.

    The message is one line that says what is wrong and, where possible, how to resolve it.
    """


def first_line(exc: BaseException) -> str:
    """An exception's first line (at most 200 characters), to quote in a one-line message."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
