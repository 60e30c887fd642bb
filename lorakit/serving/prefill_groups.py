"""How the continuous scheduler splits a turn's newcomers into prefill forwards: one packed
forward per adapter (packed_prefill.py), or, where prompts are padded, forwards of similar length."""

from __future__ import annotations

PADDING = 1.15  # a prefill forward may hold at most this many fed tokens per real token


def length_groups(newcomers: list) -> list[list]:
    """Split newcomers into prefill forwards of similar prompt length, so right-padding to the
    longest wastes at most PADDING - 1 of a forward's work (identical prompts stay together)."""
    ordered = sorted(newcomers, key=lambda a: (len(a.request.prompt_ids), a.request.prompt_ids))
    groups: list[list] = []
    real = 0
    for active in ordered:
        length = len(active.request.prompt_ids)
        if groups and (len(groups[-1]) + 1) * length <= PADDING * (real + length):
            groups[-1].append(active)
            real += length
        else:
            groups.append([active])
            real = length
    return groups


def adapter_groups(newcomers: list) -> list[list]:
    """Split newcomers into one packed prefill forward per adapter (a packed forward is one row, so
    one adapter), in order of each adapter's first request."""
    groups: dict[str, list] = {}
    for active in newcomers:
        groups.setdefault(active.request.adapter, []).append(active)
    return list(groups.values())
