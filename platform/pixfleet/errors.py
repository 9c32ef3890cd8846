"""The base of every error a user can act on: the CLI and the job entrypoints print its
message as one `error:` line and exit with its code, never with a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A config, source, model or data problem, explained in one line that names it."""

    exit_code = 2  # nothing ran, or nothing more can run until the input is fixed
