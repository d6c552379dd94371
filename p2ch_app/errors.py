"""The one exception type that reaches the user as a plain one-line message."""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix: the CLI prints the message and exits with code 2, no traceback.

    The message names the problem and the fix in one line: "<problem>; <fix>".
    """

    def with_fix(self, fix: str) -> UserError:
        """The same problem with another fix: a library message may suggest an option that only some
        commands have, and the command that caught it knows its own."""
        problem = str(self).rsplit("; ", 1)[0]
        return UserError(f"{problem}; {fix}")


def brief(err: BaseException, limit: int = 120) -> str:
    """An exception's message on one line, at most about `limit` characters, cut between words:
    library messages can run to pages, and a message cut mid-word reads as garbage. An exception
    without a message is named by its type, so the user still learns something."""
    text = " ".join(str(err).split())
    if not text:
        return type(err).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut + " ..."
