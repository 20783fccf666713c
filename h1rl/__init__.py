"""h1rl: reinforcement-learning fine-tuning of hybrid attention + Mamba language models.

`import h1rl` registers the hybrid model classes with transformers' Auto classes (see `h1rl.models`).
"""

from h1rl.models import HybridConfig, HybridForCausalLM

__version__ = "0.1.0"

__all__ = ["HybridConfig", "HybridForCausalLM", "__version__"]
