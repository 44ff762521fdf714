"""Pure mask code: the Mask object, global magnitude pruning, random control masks. Imports nothing
above it (no trainer, runs or methods)."""

from llt.pruning.controls import random_controls
from llt.pruning.magnitude import global_magnitude_prune, prune_count
from llt.pruning.mask import Mask

__all__ = ["Mask", "global_magnitude_prune", "prune_count", "random_controls"]
