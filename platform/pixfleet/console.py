"""What reaches the user's console: pixfleet's own lines, warnings that ask something of the
user, and errors. The libraries' loading bars stay off unless `pixfleet --verbose`; the
setting travels in the environment, so Ray's workers, started after it, inherit it."""

from __future__ import annotations

import os

VERBOSE_ENV = "PIXFLEET_VERBOSE"


def set_verbose(verbose: bool) -> None:
    """Called once by the CLI, before any model library is imported."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        # transformers' and huggingface_hub's bars ("Loading weights", downloads) follow this.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_model_loading() -> None:
    """diffusers' "Loading pipeline components" bar off in this process (every actor and
    replica would print one), unless verbose."""
    if not os.environ.get(VERBOSE_ENV):
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
