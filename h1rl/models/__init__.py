"""h1rl's hybrid attention + Mamba models, registered with transformers' Auto classes on import.

After `import h1rl` (or `import h1rl.models`), `AutoConfig` and `AutoModelForCausalLM.from_pretrained` load h1rl
checkpoints (model_type `h1rl_hybrid`) and Apriel-H1 checkpoints (`apriel_hybrid_ssm`, `apriel_ssm_thinker_hybrid`)
without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from h1rl.models.cache import HybridCache, KVState, MambaState
from h1rl.models.configuration import (
    AprielHybridSSMConfig,
    AprielSSMThinkerHybridConfig,
    HybridConfig,
    SSMConfig,
)
from h1rl.models.modeling import (
    AprielHybridSSMForCausalLM,
    AprielSSMThinkerHybridForCausalLM,
    HybridForCausalLM,
    HybridModel,
)

for _config, _lm in (
    (HybridConfig, HybridForCausalLM),
    (AprielHybridSSMConfig, AprielHybridSSMForCausalLM),
    (AprielSSMThinkerHybridConfig, AprielSSMThinkerHybridForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)

__all__ = [
    "AprielHybridSSMConfig",
    "AprielHybridSSMForCausalLM",
    "AprielSSMThinkerHybridConfig",
    "AprielSSMThinkerHybridForCausalLM",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "KVState",
    "MambaState",
    "SSMConfig",
]
