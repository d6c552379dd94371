"""The one exception type that reaches the user as a plain one-line message."""


class UserError(Exception):
    """Bad input the user can fix: the CLI prints the message and exits with code 2, no traceback.

    The message names the problem and the fix in one line.
    """
