"""The one error type users see: the scripts print its message as a single line and exit non-zero."""


class PipelineError(Exception):
    """A problem the user can fix: the message names the variable or file and what would be valid."""

    exit_code = 2
