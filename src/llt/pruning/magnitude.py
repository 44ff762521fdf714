"""Global magnitude pruning within an allowed set (METHOD section 4)."""

from __future__ import annotations

import torch

from llt.errors import LLTError
from llt.pruning.mask import Mask


def prune_count(fraction: float, candidates: int) -> int:
    """How many weights one round removes: round(fraction * candidates), as torch.nn.utils.prune does
    (Python's round, halves to even). After r rounds of 0.2 on the full set the density is 0.8^r."""
    return round(fraction * candidates)


@torch.no_grad()
def global_magnitude_prune(weights: dict[str, torch.Tensor], mask: Mask, fraction: float,
                           allowed: Mask | None = None, allow_empty_layer: bool = False) -> Mask:
    """Remove round(fraction * n) of the n weights that `mask` keeps and `allowed` permits, smallest |w|
    first, globally over every layer; weights outside `allowed` are never removed.

    Ties in magnitude go in layer order, then position order (a stable sort), so the result is
    deterministic. Raises LLTError if a layer would lose its last weight (unless allow_empty_layer).
    """
    if not 0.0 < fraction < 1.0:
        raise LLTError(f"prune fraction must be in (0, 1), got {fraction}")
    cand = mask if allowed is None else mask & allowed
    names = mask.names()
    scores = []
    for n in names:
        w = weights[n].detach().abs().float().flatten()
        c = cand[n].to(w.device).flatten()
        scores.append(torch.where(c, w, torch.full_like(w, float("inf"))))
    flat = torch.cat(scores)
    n_cand = cand.num_kept()
    n_remove = prune_count(fraction, n_cand)
    new = {n: m.clone() for n, m in mask.masks.items()}
    if n_remove:
        order = torch.sort(flat, stable=True).indices[:n_remove]
        removed = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        removed[order] = True
        start = 0
        for n in names:
            size = new[n].numel()
            new[n] = new[n] & ~removed[start:start + size].view_as(new[n]).to(new[n].device)
            start += size
    out = Mask(new)
    if not allow_empty_layer:
        for n in names:
            if mask[n].any() and not out[n].any():
                raise LLTError(f"pruning would remove every weight of layer {n} (density {out.density():.4%}); "
                               f"stop earlier, or set prune.allow_empty_layer=true to continue anyway")
    return out
