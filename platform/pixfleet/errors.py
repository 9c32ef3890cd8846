"""The base of every error a user can act on: the CLI and the job entrypoints print its
message as one `error:` line and exit with its code, never with a traceback."""

from __future__ import annotations

import re
import sys

_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-f]+>")
_RAISED = re.compile(r"^(pixfleet(?:\.\w+)+)\.(\w+): (.+)$", re.MULTILINE)


class UserError(Exception):
    """A config, source, model or data problem, explained in one line that names it."""

    exit_code = 2  # nothing ran, or nothing more can run until the input is fixed


def one_line(error: BaseException) -> str:
    """`Type: message` on one line, without the object reprs some libraries put in messages."""
    message = _OBJECT_REPR.sub("", str(error)).strip()
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text.splitlines()[0]


def user_error_within(error: BaseException) -> UserError | None:
    """The UserError behind `error`: itself, or the one a Ray task or actor raised, which Ray
    hands the driver wrapped (a task's error as its RayTaskError's `cause`). None if none."""
    for _ in range(8):  # Ray's wrappers nest two or three deep
        inner = getattr(error, "cause", None)
        if isinstance(inner, BaseException):
            error = inner
            continue
        if isinstance(error, UserError):
            return error
        if (named := _named_in(str(error))) or error.__cause__ is None:
            return named
        error = error.__cause__
    return None


def _named_in(text: str) -> UserError | None:
    """An actor whose constructor raised reaches the driver as text (Ray's ActorDiedError keeps
    the creation task's traceback, not its error): the last user error of a pixfleet class this
    process knows, named on a line of its own as Python prints it."""
    for module, name, message in reversed(_RAISED.findall(text)):
        raised = getattr(sys.modules.get(module), name, None)
        if isinstance(raised, type) and issubclass(raised, UserError):
            found = UserError(message)
            found.exit_code = raised.exit_code
            return found
    return None
