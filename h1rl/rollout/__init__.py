"""Fast recurrent rollouts for GRPO: `RolloutEngine.generate(prompts, num_generations, SamplingParams)`."""

from h1rl.rollout.engine import Rollout, RolloutEngine
from h1rl.rollout.sampling import SamplingParams

__all__ = ["Rollout", "RolloutEngine", "SamplingParams"]
