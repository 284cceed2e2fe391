"""The one exception type for bad input from outside the program, and a worker process's death
(here rather than in rnn.parallel so that the stages can catch it without importing that)."""


class InputError(ValueError):
    """A file, setting, model folder, archive or argument that cannot be used as given.

    The pipeline's stages and the `rnn` command report it in one line naming the culprit; any other
    exception is a bug and keeps its traceback."""


class WorkerDied(RuntimeError):
    """A worker process ended while the pool was open (rnn.parallel)."""


MAX_MESSAGE_CHARS = 300          # what an error line may quote of a value or a list (a hostile file's)


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` on one line, cut to `limit` characters (with the count of those left out)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"
