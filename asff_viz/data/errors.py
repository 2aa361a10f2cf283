"""Errors raised by the data package."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset cannot be used as given.

    The message names the file or folder, says what is wrong with it and what to do about it.
    Fixable problems (a missing image file, a box of non-positive size) are skipped and counted in the
    log instead; this error is for problems that leave nothing sensible to load.
    """
