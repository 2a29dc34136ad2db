"""The project's one user-facing error type."""


class BuilderError(Exception):
    """A problem the user can fix: bad settings, bad input, failed validation.

    The CLI prints its message on one line and exits 1, without a traceback,
    so the message must say what is wrong and what to do about it.
    """


def field_error(field_name: str, problem: str, fix: str) -> BuilderError:
    """The settings' error: the field, what is wrong with it, and the fix, on one line."""
    return BuilderError(f"{field_name}: {problem}; {fix}")
