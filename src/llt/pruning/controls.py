"""Random masks with a ticket's exact counts: the standard lottery-ticket controls.

`random`: uniformly random over all conv weights, keeping as many weights in total as the ticket.
`layerwise-random`: random within each layer, keeping as many weights in each layer as the ticket.

A sequence of tickets (one per task) gets a sequence of controls drawn from ONE random score per weight:
the control of task t keeps the k_t highest scores (globally, or per layer). Masks made that way are
nested whenever the counts are: Bottom-Up tickets grow, so their controls grow too; Top-Down tickets
shrink, and so do their controls. Pure functions over explicit inputs.
"""

from __future__ import annotations

import torch

from llt.errors import LLTError
from llt.pruning.mask import Mask
from llt.registry import RANDOM_MASKS as KINDS


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return keep


def random_controls(tickets: list[Mask], kind: str, generator: torch.Generator) -> list[Mask]:
    """One control mask per ticket, with the ticket's kept count overall (`random`) or per layer
    (`layerwise-random`), nested across tasks wherever the tickets' counts are monotone.

    Scores are uniform in [0, 1) from `generator` (CPU); ties have probability zero in practice and are
    broken by topk's order, deterministically for a given generator state.
    """
    if kind not in KINDS:
        raise LLTError(f"unknown random mask kind {kind!r} (one of {', '.join(KINDS)})")
    if not tickets:
        return []
    names = tickets[0].names()
    for t, m in enumerate(tickets[1:], 2):
        if m.names() != names:
            raise LLTError(f"the mask of task {t} covers other layers than the mask of task 1")
    shapes = {n: tickets[0][n].shape for n in names}
    scores = {n: torch.rand(shapes[n], generator=generator) for n in names}
    out = []
    for ticket in tickets:
        if kind == "layerwise-random":
            masks = {n: _top_k(scores[n], int(ticket[n].sum())).view(shapes[n]) for n in names}
        else:
            flat = torch.cat([scores[n].flatten() for n in names])
            keep, masks, start = _top_k(flat, ticket.num_kept()), {}, 0
            for n in names:
                size = scores[n].numel()
                masks[n] = keep[start:start + size].view(shapes[n])
                start += size
        out.append(Mask(masks))
    return out
