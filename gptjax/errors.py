"""One base for every mistake a user can make and fix: a bad config, mesh, file, checkpoint,
text or request. The commands catch `UserError` alone and print its message as one line
(no traceback) with a non-zero exit; anything else is a bug and keeps its traceback.

Each module names its own kind (`ConfigError`, `DataError`, `CheckpointError`, ...), derived
from this one; `ConfigError` means a config (or command-line setting) problem only."""


class UserError(Exception):
    """A one-line error for the user: the message says what is wrong and what to do."""
