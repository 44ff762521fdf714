"""`replay`: the task's data plus the exemplar memory of the earlier classes (the same memory as every
method: data.exemplars_per_class per class, random or herding), plain cross-entropy over the seen heads; no
distillation. baseline.replay_batching says how the memory enters the steps: `balanced` (the default for
replay) puts a batch of memory images beside every batch of new images, as Avalanche's replay and Mammoth's
ER; `concat` shuffles the memory into the task's data, as FACIL and PyCIL (docs/baselines.md)."""

from __future__ import annotations

from llt.methods.incremental import Incremental


class Replay(Incremental):
    """Plain cross-entropy over the seen heads: the defaults of the loop (its registry entry gives the memory)."""
