"""The one exception type the CLI turns into a one-line message instead of a traceback."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message for a one-line error (its type's name when the
    message is empty, as an EOFError's often is), cut to ``limit`` characters."""
    line = (str(e).splitlines() or [""])[0] or type(e).__name__
    return line[:limit] if limit else line


class BonetumorError(Exception):
    """A problem the user can fix (bad input, bad option, missing file); message is one line."""


class BadImageError(BonetumorError):
    """A file that cannot be read as an image."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class LeakageWarning(UserWarning):
    """The data's splits share images or patients: held-out scores will be optimistic."""


class ConfoundWarning(UserWarning):
    """Something other than the image content (file names, image style) predicts the label."""


class RankStopped(BonetumorError):
    """This rank of a torchrun job stopped because another rank failed: rank 0 prints that
    rank's line, so this one ends without a word of its own."""
