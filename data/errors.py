"""The data layer's user-facing error: a problem with files, shards, tokenizers or dataset names that the user
can fix. Its message names the file or key and what to do; the launcher prints it and exits 2 (no traceback)."""
from __future__ import annotations


class DataError(ValueError):
    """A data problem the user can fix; the message names the file or key and the fix."""


class OutputError(DataError):
    """An output a command refuses to write: it exists (and --overwrite was not given), or it is, contains or lies
    inside a checkpoint folder or the command's own input (data/output.py)."""
