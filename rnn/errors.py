"""The one exception type for bad input from outside the program."""


class InputError(ValueError):
    """A file, setting, model folder, archive or argument that cannot be used as given.

    The pipeline's stages and the `rnn` command report it in one line naming the culprit; any other
    exception is a bug and keeps its traceback."""
