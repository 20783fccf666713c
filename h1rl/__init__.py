"""h1rl: reinforcement-learning fine-tuning of hybrid attention + Mamba language models.

`import h1rl` is cheap (no torch, no transformers) and registers the hybrid model classes with transformers' Auto
classes lazily (`h1rl._auto`): `AutoConfig` / `AutoModelForCausalLM.from_pretrained` then load h1rl and Apriel-H1
checkpoints. `h1rl.HybridConfig` and `h1rl.HybridForCausalLM` are imported from `h1rl.models` on first use.
"""

from h1rl._auto import install as _install

__version__ = "0.1.0"

__all__ = ["HybridConfig", "HybridForCausalLM", "__version__"]

_install()


def __getattr__(name: str):
    if name in ("HybridConfig", "HybridForCausalLM"):
        import h1rl.models

        return getattr(h1rl.models, name)
    raise AttributeError(f"module 'h1rl' has no attribute {name!r}")
