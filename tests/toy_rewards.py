"""Rewards for tests, importable by path from recipes (`toy_rewards:distinct_tokens`; tests/ is on sys.path)."""


def distinct_tokens(completion_ids, **kwargs):
    """Varies within a group even for a random model: the number of distinct token ids of each completion."""
    return [float(len(set(ids))) for ids in completion_ids]



def rare_first_token(completion_ids, **kwargs):
    """Mostly ties (for a random 97-token model, a group of 4 is all zeros ~65% of the time): 1 if the first
    completion token id is below 10, else 0."""
    return [float(ids[0] < 10) if ids else 0.0 for ids in completion_ids]
