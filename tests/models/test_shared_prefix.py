"""`HybridModel.sharing_prefix`: a forward that runs a repeated prompt prefix once per group of rows gives the plain
forward's outputs and gradients; caches stay in place under inference and become out of place under autograd."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from h1rl.models.modeling import prefix_groups

LAYOUTS = [["t", "m2", "m2", "t"], ["m2", "i", "m2"], ["t", "t"], ["m2", "m2"]]


def grouped_batch(generator, group_sizes, prefix_len, rest_len, vocab=97):
    """Rows in groups sharing a left-padded prefix; right-padded, random continuations."""
    U = len(group_sizes)
    prefix = torch.randint(1, vocab, (U, prefix_len), generator=generator)
    prefix_mask = torch.ones(U, prefix_len, dtype=torch.long)
    for u in range(U):  # mixed prompt lengths: left padding of u tokens (at most half the prefix)
        prefix_mask[u, : u % (prefix_len // 2 + 1)] = 0
    prefix = prefix * prefix_mask
    sizes = torch.tensor(group_sizes)
    B = int(sizes.sum())
    rest = torch.randint(1, vocab, (B, rest_len), generator=generator)
    rest_mask = torch.ones(B, rest_len, dtype=torch.long)
    lengths = torch.randint(1, rest_len + 1, (B,), generator=generator)  # each row stops somewhere
    rest_mask[torch.arange(rest_len)[None] >= lengths[:, None]] = 0
    ids = torch.cat([prefix.repeat_interleave(sizes, 0), rest * rest_mask], 1)
    mask = torch.cat([prefix_mask.repeat_interleave(sizes, 0), rest_mask], 1)
    return ids, mask


def forward_backward(model, ids, mask, weights, share_len=None):
    model.zero_grad()
    if share_len is None:
        logits = model(ids, attention_mask=mask).logits
    else:
        with model.model.sharing_prefix(share_len):
            logits = model(ids, attention_mask=mask).logits
    (logits * weights * mask[..., None]).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shared_prefix_forward_and_gradients_equal_the_plain_forward(layout):
    generator = torch.Generator().manual_seed(len(layout))
    torch.manual_seed(len(layout))
    model = tiny_model(layout).train()
    ids, mask = grouped_batch(generator, [4, 1, 3, 4], prefix_len=7, rest_len=9)
    order = torch.randperm(ids.shape[0], generator=generator)  # groups scattered, as in TRL's shuffled batches
    ids, mask = ids[order], mask[order]
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=generator)
    plain, plain_grads = forward_backward(model, ids, mask, weights)
    shared, shared_grads = forward_backward(model, ids, mask, weights, share_len=7)
    real = mask.bool()
    torch.testing.assert_close(shared[real], plain[real], rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():  # relative to the largest entry: sums over many rows
        scale = grad.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(shared_grads[name] / scale, grad / scale, rtol=0, atol=1e-5, msg=name)


def test_prefix_groups():
    ids = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2]])
    first, group = prefix_groups(ids, None)  # rows anywhere in the batch (TRL shuffles them)
    assert group.tolist() == [0, 1, 0, 0] and first.tolist() == [0, 1]
    mask = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1]])  # rows 0 and 2: equal ids, different masks
    first, group = prefix_groups(ids, mask)
    assert group[0] == group[3] != group[2] and len(first) == 3
    first, group = prefix_groups(ids[:2], None)  # every prefix distinct: groups of one
    assert first.tolist() == [0, 1] and group.tolist() == [0, 1]
    model = tiny_model(["t", "m2"])
    with pytest.raises(ValueError, match="length must be >= 1"):
        with model.model.sharing_prefix(0):
            pass


def module_calls(model, run) -> dict[str, int]:
    """How many times `run()` calls each module of `model` (what ZeRO-3's parameter gathering follows)."""
    counts: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
             for name, m in model.named_modules()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return counts


@pytest.mark.parametrize("layout", [["t", "m2", "m2", "t"], ["m2", "i", "t"]])
def test_layer_calls_do_not_depend_on_the_data(layout):
    """Under sharing_prefix a batch whose rows share their prompts and one whose rows are all distinct call every
    module equally often (ZeRO-3 processes holding either must gather the same parameters in the same order), in
    training and in a no-grad (reference-model) forward, and the all-distinct batch still equals the plain forward."""
    generator = torch.Generator().manual_seed(5)
    model = tiny_model(layout).train()
    shared_ids, shared_mask = grouped_batch(generator, [3, 2], prefix_len=5, rest_len=4)
    distinct_ids, distinct_mask = grouped_batch(generator, [1, 1, 1, 1, 1], prefix_len=5, rest_len=4)

    def forward(ids, mask, grad=True):
        with torch.set_grad_enabled(grad), model.model.sharing_prefix(5):
            return model(ids, attention_mask=mask).logits

    for grad in (True, False):
        calls = [module_calls(model, lambda ids=ids, mask=mask, grad=grad: forward(ids, mask, grad))
                 for ids, mask in ((shared_ids, shared_mask), (distinct_ids, distinct_mask))]
        assert calls[0] == calls[1]
        assert all(calls[0][f"model.layers.{i}"] == 2 for i, code in enumerate(layout) if code != "i")  # two phases
    weights = torch.randn(*distinct_ids.shape, model.config.vocab_size, generator=generator)
    plain, plain_grads = forward_backward(model, distinct_ids, distinct_mask, weights)
    shared, shared_grads = forward_backward(model, distinct_ids, distinct_mask, weights, share_len=5)
    real = distinct_mask.bool()
    torch.testing.assert_close(shared[real], plain[real], rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        scale = grad.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(shared_grads[name] / scale, grad / scale, rtol=0, atol=1e-5, msg=name)


def test_checkpointing_takes_the_plain_path():
    """Under gradient checkpointing (training) the shared path is not taken: same outputs, one call per layer."""
    generator = torch.Generator().manual_seed(3)
    model = tiny_model(["t", "m2"]).train()
    model.gradient_checkpointing_enable()
    ids, mask = grouped_batch(generator, [3, 2], prefix_len=5, rest_len=4)
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=generator)
    plain, _ = forward_backward(model, ids, mask, weights)
    shared, _ = forward_backward(model, ids, mask, weights, share_len=5)
    assert torch.equal(plain, shared)


def test_cache_updates_are_in_place_for_inference_and_out_of_place_under_autograd():
    model = tiny_model(["t", "m2"])
    ids = torch.randint(1, 97, (2, 5))
    cache = model.allocate_cache(2, 8)
    buffers = [t.data_ptr() for state in cache.layers for t in state.tensors()]
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert [t.data_ptr() for state in cache.layers for t in state.tensors()] == buffers  # the engine's static memory
    cache = model.allocate_cache(2, 8)
    model.train()
    model(ids, cache=cache, use_cache=True)
    assert all(t.requires_grad for state in cache.layers for t in state.tensors())  # a differentiable prefix
