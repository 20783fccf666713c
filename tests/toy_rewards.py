"""Rewards for tests, importable by path from recipes (`toy_rewards:distinct_tokens`; tests/ is on sys.path)."""


def distinct_tokens(completion_ids, **kwargs):
    """Varies within a group even for a random model: the number of distinct token ids of each completion."""
    return [float(len(set(ids))) for ids in completion_ids]
