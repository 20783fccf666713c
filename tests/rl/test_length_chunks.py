"""The training forward split by length (`length_chunks`): the plan is optimal, and the split forward gives TRL's
log-probs, entropies and gradients on every real completion token."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset

from h1rl.rl.trainer import HybridGRPOTrainer
from h1rl.rl.training_pass import plan_length_chunks


def positions_of(groups, lengths):
    return sum(len(g) * int(lengths[g].max()) for g in groups)


def best_positions_by_enumeration(lengths, k_max):
    """Fewest positions over every split of the length-sorted rows into at most k_max contiguous groups."""
    s = sorted(lengths.tolist())
    best = {}
    for k in range(1, k_max + 1):
        for cuts in itertools.combinations(range(1, len(s)), k - 1):
            bounds = [0, *cuts, len(s)]
            cost = sum((b - a) * s[b - 1] for a, b in zip(bounds, bounds[1:]))
            best[k] = min(best.get(k, cost), cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_plan_is_the_best_split_within_its_tolerance(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (9,), generator=generator)
    groups = plan_length_chunks(lengths, max_chunks=4, tolerance=0.0)
    assert sorted(torch.cat(groups).tolist()) == list(range(9))  # every row exactly once
    assert all(torch.equal(g, g.sort().values) for g in groups)
    best = best_positions_by_enumeration(lengths, 4)
    assert positions_of(groups, lengths) == min(best.values())
    assert len(groups) == min(k for k, cost in best.items() if cost == min(best.values()))  # the fewest groups
    # with a tolerance, the fewest groups whose positions are within it of the best split
    tolerant = plan_length_chunks(lengths, max_chunks=4, tolerance=0.2)
    allowed = min(best.values()) + 0.2 * best[1]
    assert len(tolerant) == min(k for k, cost in best.items() if cost <= allowed)
    assert positions_of(tolerant, lengths) <= allowed


def test_the_plan_keeps_one_group_when_lengths_are_equal_or_one_is_asked():
    assert [g.tolist() for g in plan_length_chunks(torch.tensor([7, 7, 7]), 4)] == [[0, 1, 2]]
    assert [g.tolist() for g in plan_length_chunks(torch.tensor([3, 90, 4]), 1)] == [[0, 1, 2]]
    assert [g.tolist() for g in plan_length_chunks(torch.tensor([3, 90, 4]), 2)] == [[0, 2], [1]]
    with pytest.raises(ValueError, match="max_chunks"):
        plan_length_chunks(torch.tensor([1]), 0)


def trainer_for(model, tokenizer, tmp_path, length_chunks):
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, report_to=[], save_strategy="no", beta=0.0)
    return HybridGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                             train_dataset=Dataset.from_dict({"prompt": ["a b", "c"]}), processing_class=tokenizer,
                             share_prompt_prefix=True, length_chunks=length_chunks)


def test_the_split_forward_equals_one_padded_forward(tmp_path):
    """Rows with left-padded prompts of different lengths (some prompts repeated, as in GRPO) and completions from
    0 to 12 tokens: log-probs, entropies and parameter gradients of the split forward equal TRL's single forward on
    every real completion token; padding positions come back as 0; fewer positions are computed."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2", "i", "m2"], vocab_size=len(tokenizer)).train()
    Tp, Tc, R = 6, 12, 10
    prompt_lens = [6, 3, 3, 6, 2, 3, 6, 1, 2, 6]
    completion_lens = [12, 1, 0, 5, 12, 2, 3, 7, 1, 11]
    ids = torch.randint(4, len(tokenizer), (R, Tp + Tc))
    ids[1, :6], ids[2, :6] = ids[5, :6], ids[5, :6]  # rows 1, 2, 5 share a prompt, as G completions do
    mask = torch.zeros(R, Tp + Tc, dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        mask[r, Tp - p : Tp + c] = 1
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    completion_mask = mask[:, Tp:].bool()  # (R, Tc)

    results = {}
    for chunks in (1, 4):
        trainer = trainer_for(model, tokenizer, tmp_path / str(chunks), chunks)
        model.zero_grad()
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, Tc, compute_entropy=True)
        assert logps.shape == entropies.shape == (R, Tc)
        (logps * completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[chunks] = (logps.detach(), entropies.detach(), grads, trainer._metrics["train"])
    (lp1, ent1, grads1, _), (lp4, ent4, grads4, metrics) = results[1], results[4]
    torch.testing.assert_close(lp4[completion_mask], lp1[completion_mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent4[completion_mask], ent1[completion_mask], rtol=1e-5, atol=1e-5)
    assert (lp4[~completion_mask] == 0).all() and (ent4[~completion_mask] == 0).all()
    assert grads1.keys() == grads4.keys() and grads1
    for name in grads1:
        torch.testing.assert_close(grads4[name], grads1[name], rtol=1e-4, atol=1e-6, msg=name)
    fraction = metrics["train/forward_positions"]
    assert len(fraction) == 1 and fraction[0] < 0.8, fraction  # (split into groups, trimmed)


def test_no_tolerance_gives_as_many_groups_as_asked_or_as_distinct_lengths():
    """What processes rely on to run equally many forwards (each re-plans with the fewest count of any)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 12, (int(torch.randint(1, 16, (1,), generator=generator)),), generator=generator)
        for k in range(1, 6):
            assert len(plan_length_chunks(lengths, k, tolerance=0.0)) == min(k, lengths.unique().numel())


def test_forwards_capped_by_batch_size_run_as_many_as_trl(tmp_path, monkeypatch):
    """TRL's no-grad old and reference log-probs pass batch_size: the split then runs ceil(rows / batch_size)
    forwards like TRL (so that processes under ZeRO-3 run equally many, whatever their lengths; grouping by length
    alone would run 3 here), each over rows of similar length, with TRL's log-probs."""
    from trl import GRPOTrainer

    from h1rl.models.modeling import HybridModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_model(["t", "m2"], vocab_size=len(tokenizer)).eval()
    R, Tp, Tc = 8, 3, 9
    ids = torch.randint(4, len(tokenizer), (R, Tp + Tc))
    mask = torch.ones(R, Tp + Tc, dtype=torch.long)
    for r, c in enumerate([9, 1, 1, 2, 9, 1, 9, 1]):
        mask[r, Tp + c :] = 0
    shapes = []
    original = HybridModel.forward
    monkeypatch.setattr(HybridModel, "forward", lambda self, input_ids=None, **kw: shapes.append(input_ids.shape)
                        or original(self, input_ids=input_ids, **kw))
    trainer = trainer_for(model, tokenizer, tmp_path, 4)
    with torch.no_grad():
        plain = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, Tc, batch_size=4)[0]
        shapes.clear()
        split = trainer._get_per_token_logps_and_entropies(model, ids, mask, Tc, batch_size=4)[0]
    assert sorted(tuple(s) for s in shapes) == [(4, Tp + 1), (4, Tp + Tc)], shapes  # 2 forwards, as TRL
    completion = mask[:, Tp:].bool()
    torch.testing.assert_close(split[completion], plain[completion], rtol=1e-5, atol=1e-5)
