"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad params, a missing source, an empty corpus: the message says what and where."""


class DataValidationError(UserError):
    """A table failed its schema. The message lists failing checks and rows."""
