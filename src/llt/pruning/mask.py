"""The Mask: boolean keep-masks over every conv weight of a model, keyed by parameter name.

Heads, BatchNorm parameters and biases are never pruned (as in the original), so a Mask covers exactly
the names of `conv_weight_names(model)`. Density is kept / total in [0, 1]; "remaining weights" is the
same number in percent, for display. Masks are applied in place (weights and gradients) by the trainer,
not through forward hooks, so state_dict keys stay plain and a deepcopy of a model just works.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llt.errors import LLTError
from llt.models import conv_weight_names
from llt.storage import load_checkpoint, save_checkpoint


class Mask:
    def __init__(self, masks: dict[str, torch.Tensor]):
        for name, m in masks.items():
            if m.dtype != torch.bool:
                raise TypeError(f"mask {name} must be a bool tensor, got {m.dtype}")
        self.masks = dict(masks)

    # --------------------------------------------------------------------------------------- creation
    @classmethod
    def ones(cls, model: torch.nn.Module) -> "Mask":
        params = dict(model.named_parameters())
        return cls({n: torch.ones_like(params[n], dtype=torch.bool) for n in conv_weight_names(model)})

    @classmethod
    def from_nonzero(cls, model: torch.nn.Module) -> "Mask":
        params = dict(model.named_parameters())
        return cls({n: params[n].detach() != 0 for n in conv_weight_names(model)})

    # --------------------------------------------------------------------------------------- counts
    def names(self) -> list[str]:
        return list(self.masks)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def num_kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def num_total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def density(self) -> float:
        """Kept fraction of all masked weights, in [0, 1]."""
        return self.num_kept() / self.num_total()

    def per_layer_density(self) -> dict[str, float]:
        return {n: float(m.float().mean()) for n, m in self.masks.items()}

    # --------------------------------------------------------------------------------------- algebra
    def _same_names(self, other: "Mask") -> None:
        if self.masks.keys() != other.masks.keys():
            diff = sorted(set(self.masks) ^ set(other.masks))
            raise LLTError(f"masks cover different layers ({diff[:3]})")

    def __and__(self, other: "Mask") -> "Mask":
        self._same_names(other)
        return Mask({n: m & other.masks[n] for n, m in self.masks.items()})

    def __or__(self, other: "Mask") -> "Mask":
        self._same_names(other)
        return Mask({n: m | other.masks[n] for n, m in self.masks.items()})

    def __invert__(self) -> "Mask":
        return Mask({n: ~m for n, m in self.masks.items()})

    def __eq__(self, other) -> bool:
        return isinstance(other, Mask) and self.masks.keys() == other.masks.keys() and all(
            torch.equal(m, other.masks[n]) for n, m in self.masks.items())

    def first_outside(self, other: "Mask") -> tuple[str, int] | None:
        """(layer, count) of the first layer where this mask keeps weights that `other` does not; None if a subset."""
        self._same_names(other)
        for n, m in self.masks.items():
            extra = int((m & ~other.masks[n]).sum())
            if extra:
                return n, extra
        return None

    def issubset(self, other: "Mask") -> bool:
        return self.first_outside(other) is None

    def to(self, device) -> "Mask":
        return Mask({n: m.to(device) for n, m in self.masks.items()})

    # --------------------------------------------------------------------------------------- model
    def check_fits(self, model: torch.nn.Module, source: str = "mask") -> None:
        """Raise LLTError unless the mask covers exactly the model's conv weights with matching shapes."""
        params = dict(model.named_parameters())
        expected = conv_weight_names(model)
        missing = [n for n in expected if n not in self.masks]
        unexpected = [n for n in self.masks if n not in expected]
        if missing or unexpected:
            raise LLTError(f"{source}: the mask does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for n in expected:
            if tuple(self.masks[n].shape) != tuple(params[n].shape):
                raise LLTError(f"{source}: {n} has shape {tuple(self.masks[n].shape)} in the mask, the model's weight "
                               f"is {tuple(params[n].shape)}")

    @torch.no_grad()
    def apply_(self, model: torch.nn.Module) -> None:
        """Zero the pruned weights of `model` in place."""
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            params[n].mul_(m.to(params[n].device))

    def pruned_nonzero(self, model: torch.nn.Module) -> dict[str, int]:
        """Layers whose pruned weights are not exactly zero, with the count (empty when all is well)."""
        params = dict(model.named_parameters())
        out = {}
        for n, m in self.masks.items():
            bad = int((params[n].detach()[~m.to(params[n].device)] != 0).sum())
            if bad:
                out[n] = bad
        return out

    # --------------------------------------------------------------------------------------- files
    def save(self, path: str | Path, **meta) -> None:
        """A plain dict of bool tensors (loadable with torch.load(weights_only=True)), written atomically."""
        save_checkpoint(path, {n: m.cpu() for n, m in self.masks.items()},
                        {"kind": "mask", "density": self.density(), **meta})

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module | None = None) -> "Mask":
        state, _ = load_checkpoint(path)
        bad = [n for n, m in state.items() if not isinstance(m, torch.Tensor) or m.dtype != torch.bool]
        if bad:
            raise LLTError(f"{path}: not a mask file ({bad[0]} is not a bool tensor)")
        mask = cls(state)
        if model is not None:
            mask.check_fits(model, str(path))
        return mask

    def to_prune_layout(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state_dict in torch.nn.utils.prune's layout: `<name>_orig` and `<name>_mask` for
        every masked weight (load it into a model prepared with prune.custom_from_mask / identity)."""
        state = model.state_dict()
        out = {}
        for k, v in state.items():
            if k in self.masks:
                out[k + "_orig"] = v.detach().clone()
                out[k + "_mask"] = self.masks[k].to(v.dtype)
            else:
                out[k] = v
        return out
