"""One base for every error a user sees (as docker-py's DockerException): a message that names
the thing and the fix, and the exit code it ends envcheck with. The command layer catches this
base once (process.py) and prints its lines; anything else escaping is a programmer error.

    1  the input was read and something about it failed (a digest mismatch, a failed build)
    2  the input cannot be read at all, or the command was called wrongly (a bad path, a bad
       reference, no cluster configuration)
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128  # + the signal's number, as a shell reports a command a signal ended


class EnvcheckError(Exception):
    """A failure to report in one line (`Error: <message>`) and end with `exit_code`."""

    exit_code = EXIT_FAILED

    def lines(self) -> list[str]:
        """What is printed on stderr: the message first, then any detail lines."""
        return [str(self)]


class UnreadableInput(EnvcheckError):
    """An input that cannot be read at all (a path that is not there, not an image, a reference
    or option value that does not parse)."""

    exit_code = EXIT_USAGE
