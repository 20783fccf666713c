"""Logging of h1rl's commands: one rank-aware handler for h1rl's loggers, transformers' verbosity alongside.

Library modules log through `logging.getLogger(__name__)` (loggers under "h1rl") and do not print. Commands whose
job is printing print from their `main()`: `h1rl recipes`, `h1rl env`, the tables of `h1rl bench` and `h1rl eval`,
the demo's and `h1rl distill`'s closing summaries.

Each command's `main()` calls `setup_logging(level)` with its `--log_level` (for `h1rl grpo` that is TrainingArguments'
own `log_level`, which the Trainer also applies to transformers): on the main process (RANK 0, or no launcher)
h1rl's messages of `level` and up go to stderr, on the other processes warnings and errors only (the default of
TrainingArguments' `log_level_replica`), so an 8-GPU run prints its progress once. `passive` (TrainingArguments'
default) shows h1rl's info messages and leaves transformers' verbosity as it is.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_LEVELS = ("detail", "debug", "info", "warning", "error", "critical", "passive")  # TrainingArguments' choices
_LEVELS = {"detail": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL, "passive": logging.INFO}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each message (a test's capture, a redirected stream)."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


_handler: _StderrHandler | None = None


def is_main_process() -> bool:
    """Whether this is the main process of a launched run (`RANK`, set by torchrun, deepspeed, accelerate and srun
    through them), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(level: str = "passive") -> int:
    """Route h1rl's loggers to stderr at `level` (one of LOG_LEVELS) on the main process and at warning elsewhere, and
    set transformers' verbosity the same way unless `level` is passive; returns the level set on this process."""
    global _handler
    if level not in _LEVELS:
        raise ValueError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    value = _LEVELS[level] if is_main_process() else max(_LEVELS[level], logging.WARNING)
    logger = logging.getLogger("h1rl")
    if _handler is None:
        _handler = _StderrHandler()
        _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(_handler)
    logger.setLevel(value)
    if level != "passive" and "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(value)
    return value
