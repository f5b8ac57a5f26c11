"""The one exception type the CLI turns into a one-line message instead of a traceback."""


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
