"""One rank of a 2-process run whose ranks hold *different* data: `data_worker.py {zero3,zero2,ddp} REPORT_DIR`.

ZeRO-3 gathers each module's parameters through hooks at every call, so every process must call the same modules in
the same order the same number of times, whatever its data. Each rank builds the same tiny hybrid (partitioned by
`deepspeed.initialize` under ZeRO-3, every parameter: no persistence threshold), then, with data that differ by rank:

1. a training step under `sharing_prefix`: rank 0's rows share their prompts, rank 1's are all distinct;
2. a no-grad forward under `sharing_prefix` (what TRL's reference model runs with beta > 0), same data;
3. (ZeRO-3) a rollout with the weights left partitioned (`ds3_gather_for_generation: false`): rank 0's rows all stop
   at their first token, rank 1's run to `max_new_tokens`, with prompts of other lengths and a chunked prefill;
   then the same rollout with the weights gathered, for comparison.

It writes `rank{R}.json`: the loss, the reference forward's logits sum, and both rollouts' tokens. A rank out of step
with the other hangs in a collective or fails with a gloo error; the test's timeout turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 6,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def batch(rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """6 rows: prompts of 5 left-padded tokens, completions of 4 right-padded ones. Rank 0: two prompts, 3 rows each
    (shared prefixes); rank 1: six distinct prompts."""
    prompts = torch.randint(1, 97, (2 if rank == 0 else 6, 5), generator=generator)
    prompts = prompts.repeat_interleave(3, 0) if rank == 0 else prompts
    prompt_mask = torch.ones(6, 5, dtype=torch.long)
    prompt_mask[1::2, :2] = 0
    completion = torch.randint(1, 97, (6, 4), generator=generator)
    completion_mask = (torch.arange(4)[None] < torch.tensor([4, 2, 3, 1, 4, 2])[:, None]).long()
    return torch.cat([prompts * prompt_mask, completion], 1), torch.cat([prompt_mask, completion_mask], 1)


def main(stage: str, out: Path) -> None:
    import deepspeed

    from h1rl.models import HybridForCausalLM
    from h1rl.rollout import RolloutBudget, RolloutEngine, SamplingParams

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    config = tiny_config(["t", "m2", "i", "m2", "t"])
    config.use_cache = False
    model = HybridForCausalLM(config)  # deepspeed.initialize partitions it under ZeRO-3
    if stage == "ddp":
        engine = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        module = model
    else:
        ds_config = DS_CONFIG if stage == "zero3" else {**DS_CONFIG, "zero_optimization": {"stage": 2}}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config)
        module = engine.module
    generator = torch.Generator().manual_seed(100 + rank)
    ids, mask = batch(rank, generator)
    report = {"rank": rank}

    engine.train()
    with module.model.sharing_prefix(5):
        loss = engine(ids, attention_mask=mask).logits.float().pow(2).mean()
    if stage == "ddp":
        loss.backward()
        optimizer.step()
    else:
        engine.backward(loss)
        engine.step()
    report["loss"] = float(loss)

    engine.eval()
    with torch.no_grad(), module.model.sharing_prefix(5):
        report["reference_sum"] = float(engine(ids, attention_mask=mask).logits.float().sum())

    if stage == "zero3":
        prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11]] if rank == 0 else [[12, 13], [14, 15, 16, 17, 18, 19, 20, 21]]
        stops = list(range(97)) if rank == 0 else []  # rank 0: every token stops its row
        params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=stops, seed=7)
        budget = RolloutBudget(max_rows=3, prefill_chunk=3)
        partitioned = RolloutEngine(module, pad_token_id=0, budget=budget)
        assert partitioned.is_synced(), "ZeRO-3 weights left partitioned: the engine must sync its calls"
        rollout = partitioned.generate(prompts, 2, params)
        report["partitioned"] = rollout.completions()
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            rollout = RolloutEngine(module, pad_token_id=0, budget=budget).generate(prompts, 2, params)
        report["gathered"] = rollout.completions()

    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from h1rl.distributed import strip_launcher_args

    stage, out = strip_launcher_args(sys.argv[1:])
    main(stage, Path(out))
