"""`replay`: the task's data plus the exemplar memory of the earlier classes (the same memory as every
method: data.exemplars_per_class per class, random or herding), shuffled together, plain cross-entropy
over the seen heads; no distillation."""

from __future__ import annotations

from llt.methods.incremental import Baseline


class Replay(Baseline):
    name = "replay"
    replays_memory = True
