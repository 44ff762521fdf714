"""lifelong-tickets: lifelong lottery tickets (Top-Down / Bottom-Up pruning) for class-incremental learning."""

__version__ = "0.1.0"
