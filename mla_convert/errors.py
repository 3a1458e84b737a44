"""The one exception type the command line turns into a single clear line and a non-zero exit."""


class ConversionError(Exception):
    """A problem the user can fix: bad input, bad flags, an unsupported model.

    The message is one line that says what is wrong and, where possible, how to resolve it.
    """
