"""Checkpoints and resuming: the one policy `h1rl grpo`, `h1rl distill` (each stage) and the demo follow.

- A run writes transformers' `checkpoint-N/` folders into its output directory; a checkpoint is *complete* once its
  `trainer_state.json` (which the Trainer writes last) parses. A run killed while saving leaves an incomplete one,
  which is skipped with a warning.
- Run again with the same command, a run resumes from its newest complete checkpoint (`last_complete_checkpoint`):
  weights, optimizer, scheduler, step counter and data position, the Trainer's own resume.
- Every run keeps the config it ran with in `resolved_config.yaml` (`record_config`). Started again with a changed
  config, it names the keys that changed: `h1rl grpo` logs them and goes on (a longer `max_steps`, another
  learning rate), `h1rl distill` refuses (its recorded layer swaps were decided under the old plan: choose another
  `output_dir`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from h1rl.config_io import ConfigError, diff_keys, parse_yaml

logger = logging.getLogger(__name__)

CONFIG_FILE = "resolved_config.yaml"


def checkpoint_step(path: str | Path) -> int:
    """N of a `checkpoint-N` folder."""
    return int(Path(path).name.rsplit("-", 1)[-1])


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` in `output_dir` whose trainer_state.json parses, or None."""
    candidates = []
    for path in Path(output_dir).glob("checkpoint-*"):
        if not path.name.rsplit("-", 1)[-1].isdigit():
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            logger.warning("ignoring incomplete checkpoint %s", path)
            continue
        candidates.append((checkpoint_step(path), path))
    return max(candidates)[1] if candidates else None


def record_config(output_dir: str | Path, config: dict[str, Any], main_process: bool = True,
                  refuse_changes: bool = False) -> list[str]:
    """Compare `config` (plain keys and values) with the one recorded in `output_dir`, then record it; returns the
    dotted keys that changed. With `refuse_changes` a change is a ConfigError and nothing is written; otherwise it is
    logged and the new config replaces the old. Only the main process writes."""
    out = Path(output_dir)
    saved = out / CONFIG_FILE
    changed = diff_keys(parse_yaml(saved.read_text()), config) if saved.is_file() else []
    if changed and refuse_changes:
        raise ConfigError(f"{out} holds a run started with a different config ({', '.join(changed)} changed; see "
                          f"{saved}); resume with the same config or choose another output_dir")
    if changed:
        logger.warning("resuming %s with a changed config: %s", out, ", ".join(changed))
    if main_process and (changed or not saved.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(yaml.safe_dump(config, sort_keys=False))
    return changed
