"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class TfmqError(ValueError):
    """A problem with the user's input (a path, a file, a value), not a bug in tfmq.

    It is a ValueError so that config validation reads naturally from Python as well.
    """
