"""Fast recurrent rollouts for GRPO: `RolloutEngine.generate(prompts, num_generations, SamplingParams)`."""

from h1rl.rollout.engine import Rollout, RolloutBudget, RolloutEngine
from h1rl.rollout.phase import ResumedRow
from h1rl.rollout.sampling import SamplingParams

__all__ = ["ResumedRow", "Rollout", "RolloutBudget", "RolloutEngine", "SamplingParams"]
