"""`DataError`: the data section of the config points at data that cannot be read or made."""

from __future__ import annotations


class DataError(ValueError):
    """The data section of the config points at data that cannot be read.

    Every message names the `data.*` field to change (as spelled on the command line) and
    the fix.
    """
