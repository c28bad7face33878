"""Logging set-up for command-line entry points; libraries only call logging.getLogger(__name__)."""

import logging

from rich.logging import RichHandler


def setup_logging(verbosity: int = 0) -> None:
    """WARNING by default, INFO with -v, DEBUG with -vv; rendered through rich on stderr."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)], force=True)
    quiet_library_notices()


def quiet_library_notices() -> None:
    """Silence notices of libraries that mean nothing to a user; in the CLI and in every Ray worker it starts."""
    # torch warns once per process that is_fx_tracing changed meaning, when peft asks it
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
