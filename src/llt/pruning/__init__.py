"""Masks, magnitude pruning and the ticket searches (Top-Down, Bottom-Up)."""

from llt.pruning.magnitude import global_magnitude_prune, prune_count
from llt.pruning.mask import Mask

__all__ = ["Mask", "global_magnitude_prune", "prune_count"]
