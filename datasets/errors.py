"""The one exception type for bad datasets, so callers can catch dataset problems separately from bugs."""

from __future__ import annotations

from fm_policy.errors import UserError


class DatasetError(UserError):
    """A dataset store is malformed or does not hold what was asked for.

    The message always names the store, the key (when one is involved) and the problem, because a user staring at a
    traceback from a 25k-step zarr needs to know which array to look at, not just that "an assertion failed".
    """

    def __init__(self, store: str, problem: str, key: str | None = None):
        self.store = store
        self.key = key
        self.problem = problem
        where = f"{store}, key '{key}'" if key else store
        super().__init__(f"{where}: {problem}")
