"""`import h1rl` registers the hybrid classes with transformers' Auto classes without importing them (lazily).

`h1rl.models` registers every class when it is imported, but importing it loads torch and transformers' modeling
code (~3 s), and `import h1rl` must stay cheap: the command line imports it (`h1rl --help` in well under a second).
Users rely on `import h1rl; AutoModelForCausalLM.from_pretrained(hybrid_dir)` working, so `import h1rl` installs a
hook instead (`install`):

- once transformers' config mapping exists (`transformers.models.auto.configuration_auto`, which every Auto class
  imports; right away if it already does), a lookup of one of h1rl's model types (`MODEL_TYPES`) in it imports
  `h1rl.models` first, which registers the configs and models for AutoConfig, AutoModel and AutoModelForCausalLM;
- a lookup by config class needs no hook: an h1rl config object exists only after `h1rl.models` was imported.

`tests/test_cli.py` checks that `import h1rl` imports neither torch nor transformers, and that loading through the
Auto classes works whichever of h1rl and transformers is imported first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

MODEL_TYPES = ("h1rl_hybrid", "apriel_hybrid_ssm", "apriel_ssm_thinker_hybrid")  # h1rl.models' config classes'
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"


def install() -> None:
    """Make transformers' config mapping import `h1rl.models` on a lookup of an h1rl model type (see the docstring)."""
    module = sys.modules.get(_CONFIG_AUTO)
    if module is not None:
        _hook_mapping(module)
    elif not any(isinstance(finder, _HookOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HookOnImport())


def _hook_mapping(module) -> None:
    mapping = module.CONFIG_MAPPING
    base = type(mapping)
    if getattr(base, "_h1rl_hooked", False):
        return

    class RegisteringConfigMapping(base):
        _h1rl_hooked = True

        def __getitem__(self, key):
            _register_if_ours(self, key)
            return super().__getitem__(key)

        def __contains__(self, key):
            _register_if_ours(self, key)
            return super().__contains__(key)

        def __reduce__(self):  # pickles as transformers' own class
            return base._from_pickle, (dict(self._mapping), dict(self._extra_content))

    mapping.__class__ = RegisteringConfigMapping


def _register_if_ours(mapping, key) -> None:
    if key in MODEL_TYPES and key not in mapping._extra_content:
        import h1rl.models  # noqa: F401  (registers the classes)


class _HookOnImport(importlib.abc.MetaPathFinder):
    """Hooks transformers' config mapping right after its module has run (then leaves `sys.meta_path`)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _CONFIG_AUTO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_hook(module):
            exec_module(module)
            _hook_mapping(module)

        spec.loader.exec_module = exec_and_hook  # this module's own loader object
        return spec
