"""Rewards for GRPO on verifiable math: accuracy (math-verify in killable worker processes), format, overlong
penalty, and the reward-function contract (TRL's) with `checked`, which turns contract violations into errors that
name the function and the sample. Guide: docs/rewards.md.

Every reward here is a TRL reward function: `f(prompts=..., completions=..., completion_ids=..., **columns)`
returning one float (or None) per completion, for plain-text or chat-message completions alike.
"""

from h1rl.rewards.accuracy import AccuracyReward, accuracy_reward
from h1rl.rewards.contract import RewardError, checked, validate_rewards
from h1rl.rewards.format import FormatReward, format_reward
from h1rl.rewards.length import OverlongPenalty, overlong_penalty

__all__ = [
    "AccuracyReward",
    "FormatReward",
    "OverlongPenalty",
    "RewardError",
    "accuracy_reward",
    "checked",
    "format_reward",
    "overlong_penalty",
    "validate_rewards",
]
