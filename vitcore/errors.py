"""Project exceptions: expected problems a person can act on.

The CLI turns each into a one-line message and the exit code below; the Python API
raises them as they are. Anything else escaping the library is a bug.
"""


def one_line(text, limit: int | None = 200) -> str:
    """A message (or an exception's text) on one line, whitespace collapsed, at most ``limit``
    characters (None: all of it)."""
    return " ".join(str(text).split())[:limit]


class VitExtractError(Exception):
    """A problem with the inputs, settings or environment, worded for a person."""

    exit_code = 1


class UsageError(VitExtractError):
    """A bad option value or combination (exit 2, like a command-line usage error)."""

    exit_code = 2


class OutputExistsError(UsageError):
    """The output file exists and neither --resume nor --overwrite was given."""


class ResumeMismatchError(UsageError):
    """--resume was asked for a file made with different settings (a settings refusal: exit 2)."""


class WeightsError(VitExtractError):
    """A weights file that cannot be read or does not fit the encoder."""


class Interrupted(VitExtractError):
    """The run was stopped by a signal after its last batch was committed."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number  # 130 for SIGINT, 143 for SIGTERM
