"""The one exception type for mistakes a user can fix (bad config, bad files, bad folders).

The CLI prints such an error as a single line and exits with status 2, without a traceback.
Internal bugs stay ordinary exceptions (and keep their traceback).
"""


class LLTError(Exception):
    """A user-facing error: the message alone must tell what is wrong and, where possible, how to fix it."""
