"""The one exception type for mistakes a user can fix (bad path, missing column, bad value)."""


class ChexmemError(Exception):
    """An error caused by user input; the CLI prints its message on one line and exits 2."""
