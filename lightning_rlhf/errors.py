"""Errors a user causes (bad config value, missing checkpoint, malformed data row).

They subclass the builtin type a caller would expect (ValueError, FileNotFoundError) and `UserError`,
which the command line prints as one clear message (exit status 2) instead of a traceback.

Simplification: four kinds cover every user error (config, data, missing file, unwritable output); anything
else is a bug and keeps its traceback. The catalogue of bad inputs and their messages is docs/errors.md.
"""

from __future__ import annotations


class UserError(Exception):
    """Mixin: the message names the bad thing and the fix; no traceback is needed."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (unknown name, sizes that do not divide, ...)."""


class DataError(UserError, ValueError):
    """A data source or row that cannot be read; the message gives file and line where known."""


class MissingFileError(UserError, FileNotFoundError):
    """A checkpoint or data path that does not exist; the message says what writes it."""


class NotWritableError(UserError, OSError):
    """An output path that cannot be written (a file in the way, no permission, the disk full)."""


class DataWarning(UserWarning):
    """Rows that were skipped (and counted); the message names the source, a row and the fix."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first UserError in an exception's cause/context chain (jsonargparse and Lightning wrap them)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
