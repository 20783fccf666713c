"""GRPO for hybrids on TRL: `HybridGRPOTrainer` (rollouts from h1rl's engine, everything else TRL's) and its config,
`HybridGRPOConfig` (TRL's GRPOConfig plus h1rl's settings)."""

from h1rl.rl.config import HybridGRPOConfig
from h1rl.rl.trainer import HybridGRPOTrainer

__all__ = ["HybridGRPOConfig", "HybridGRPOTrainer"]
