"""GRPO for hybrids on TRL: `HybridGRPOTrainer` (rollouts from h1rl's engine, everything else TRL's)."""

from h1rl.rl.trainer import HybridGRPOTrainer

__all__ = ["HybridGRPOTrainer"]
