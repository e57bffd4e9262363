"""The base class of every error that is the user's to fix (a bad config, dataset, checkpoint or argument).

The CLI turns a `UserError` into one line on stderr and exit code 2, because its message already says what is
wrong and where; any other exception is a bug in fm-policy (or a library) and keeps its traceback, so that it is
reported rather than hidden behind a one-line message.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave us is wrong; the message names the file / key / argument and the problem.

    A `ValueError` subclass so that library callers catching `ValueError` for bad input keep working.
    """
