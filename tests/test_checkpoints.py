"""`h1rl.checkpoints`: the one resume policy of grpo and distill: the newest complete checkpoint, and the recorded
config compared with the new one (logged, or refused)."""

from __future__ import annotations

import logging

import pytest
import yaml

from h1rl.checkpoints import checkpoint_step, last_complete_checkpoint, record_config
from h1rl.config_io import ConfigError


def test_incomplete_checkpoints_are_skipped(tmp_path):
    for step, state in ((1, "{}"), (2, "{}"), (3, '{"trunc'), (10, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:  # checkpoint-10: killed before trainer_state.json
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    best = last_complete_checkpoint(tmp_path)
    assert best.name == "checkpoint-2" and checkpoint_step(best) == 2
    assert last_complete_checkpoint(tmp_path / "nowhere") is None


def test_a_changed_config_is_logged_or_refused(tmp_path, caplog):
    config = {"learning_rate": 1e-5, "stages": [{"max_steps": 3}]}
    assert record_config(tmp_path, config) == []
    assert yaml.safe_load((tmp_path / "resolved_config.yaml").read_text()) == config
    changed = {"learning_rate": 2e-5, "stages": [{"max_steps": 4}]}
    with pytest.raises(ConfigError, match=r"learning_rate, stages.0.max_steps changed"):
        record_config(tmp_path, changed, refuse_changes=True)
    assert yaml.safe_load((tmp_path / "resolved_config.yaml").read_text()) == config  # nothing written
    with caplog.at_level(logging.WARNING, logger="h1rl"):
        assert record_config(tmp_path, changed) == ["learning_rate", "stages.0.max_steps"]
    assert "with a changed config: learning_rate, stages.0.max_steps" in caplog.text
    assert yaml.safe_load((tmp_path / "resolved_config.yaml").read_text()) == changed
    assert record_config(tmp_path / "other", config, main_process=False) == []
    assert not (tmp_path / "other").exists()  # only the main process writes
