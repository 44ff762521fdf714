"""`finetune` (the lower bound): each task is learned from its own data only, by cross-entropy over the
seen heads; no exemplar memory, no teacher, no penalty. Old classes are forgotten."""

from __future__ import annotations

from llt.methods.incremental import Incremental


class Finetune(Incremental):
    """Plain cross-entropy over the seen heads: the defaults of the loop (its registry entry gives the memory)."""
