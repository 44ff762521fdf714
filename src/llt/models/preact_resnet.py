"""CIFAR PreAct-ResNet-18 with two branches of per-task linear heads (METHOD section 2).

Backbone (as in the authors' model.py): a 3x3 stem conv feeding four stages of two pre-activation blocks
(widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), 1x1 conv shortcuts on the pre-activated input where the shape
changes, no final BN-ReLU, global average pooling to an 8w-dimensional feature. All convs have no bias.
With w = 64 there are 11,159,232 conv weights. Backbone parameter names match the original.

Heads: `heads_main[t]` (the balanced branch, used for every evaluation and decision) and `heads_aux[t]`
(the random branch, an auxiliary training signal), one `Linear(8w, C)` per task each, all created up
front. Logits for "heads 1..k" are the concatenation of the first k heads of a branch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BRANCHES = ("main", "aux")

# A fused batch is a concatenation of sub-batches; `segments` lists them as (size, updates) pairs. In
# train mode each segment is normalised with its own batch statistics, exactly as if it had gone
# through the network alone, and the BatchNorm running statistics are updated `updates` times with that
# segment's statistics, in order: the state the original reaches with one forward pass per update.
Segments = tuple[tuple[int, int], ...]


class SegmentBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that can normalise a concatenated batch per segment (ghost-batch style, uneven sizes)."""

    def forward(self, x: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
        if segments is None or not self.training:
            return super().forward(x)
        outs = []
        parts = x.split([n for n, _ in segments]) if len(segments) > 1 else (x,)
        for part, (_, updates) in zip(parts, segments):
            # Normalise with this segment's batch statistics; the running statistics are updated below,
            # explicitly, so that autograd never sees them change. They come from the kernel's own
            # statistics (mean and 1/sqrt(biased var + eps), float32 also for bf16 input), as a train-mode
            # BatchNorm with running statistics would use them: no second pass over the activations.
            out, mean, invstd = torch.native_batch_norm(part, self.weight, self.bias, None, None, True, 0.0, self.eps)
            outs.append(out)
            if updates:
                with torch.no_grad():
                    n = part.numel() // part.shape[1]
                    var = (invstd.detach().float().pow(-2) - self.eps).clamp_min_(0) * (n / max(n - 1, 1))
                    mean = mean.detach().float()
                    for _ in range(updates):  # what `updates` separate train-mode passes would do
                        self.running_mean.lerp_(mean, self.momentum)
                        self.running_var.lerp_(var, self.momentum)
        self.num_batches_tracked.add_(sum(u for _, u in segments))
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = SegmentBatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = SegmentBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def projection(self, out: torch.Tensor) -> torch.Tensor:
        """The 1x1 shortcut conv. On a channels-last CPU tensor with stride s > 1 it is computed as a stride-1
        conv of every s-th pixel (the same products and sums): oneDNN's channels-last backward of the strided
        1x1 conv corrupts the heap for 8 or 12 input channels (torch 2.13 CPU; docs/training.md)."""
        conv = self.shortcut[0]
        s = conv.stride[0]
        if s > 1 and out.device.type == "cpu" and not out.is_contiguous() \
                and out.is_contiguous(memory_format=torch.channels_last):
            return F.conv2d(out[:, :, ::s, ::s], conv.weight)
        return self.shortcut(out)

    def forward(self, x: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
        out = F.relu(self.bn1(x, segments))
        # The projection shortcut sees the pre-activated input; the identity shortcut the raw input.
        shortcut = self.projection(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out, segments)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 for small images with per-task heads in two branches.

    Args:
        num_tasks: heads per branch.
        classes_per_task: outputs per head (C).
        width: channels of the first stage (64 in the paper).
        stem_stride: 1 for 32x32 inputs; 2 keeps the same feature-map sizes (and cost) for 64x64 inputs.
    """

    def __init__(self, num_tasks: int, classes_per_task: int, width: int = 64, stem_stride: int = 1):
        super().__init__()
        self.num_tasks, self.classes_per_task, self.width, self.stem_stride = num_tasks, classes_per_task, width, stem_stride
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, width, 3, stem_stride, 1, bias=False)
        in_planes, stages = width, []
        for planes, stride in zip(widths, (1, 2, 2, 2)):
            stages.append(nn.ModuleList([PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = widths[-1]
        self.heads_main = nn.ModuleList(nn.Linear(self.feature_dim, classes_per_task) for _ in range(num_tasks))
        self.heads_aux = nn.ModuleList(nn.Linear(self.feature_dim, classes_per_task) for _ in range(num_tasks))

    def features(self, x: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) -> pooled features (N, feature_dim).

        `segments` (train mode only): BatchNorm statistics per sub-batch of a concatenated batch.
        """
        out = self.conv1(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                out = block(out, segments)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def head_logits(self, feats: torch.Tensor, num_heads: int, branch: str = "main") -> torch.Tensor:
        """Concatenated logits of heads 1..num_heads of one branch: (N, num_heads * C)."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        if not 1 <= num_heads <= self.num_tasks:
            raise ValueError(f"num_heads must be in 1..{self.num_tasks}, got {num_heads}")
        heads = self.heads_main if branch == "main" else self.heads_aux
        return torch.cat([heads[t](feats) for t in range(num_heads)], dim=1)

    def forward(self, x: torch.Tensor, num_heads: int, branch: str = "main") -> torch.Tensor:
        return self.head_logits(self.features(x), num_heads, branch)


def conv_weight_names(model: nn.Module) -> list[str]:
    """Names of every Conv2d weight: the prunable parameters (heads, BN and biases are never pruned)."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def count_conv_weights(model: nn.Module) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in conv_weight_names(model))


def remaining_weights(model: nn.Module) -> float:
    """Percent of conv weights that are non-zero (the paper's "remaining weights")."""
    params = dict(model.named_parameters())
    names = conv_weight_names(model)
    nonzero = sum(int(torch.count_nonzero(params[n].detach())) for n in names)
    return 100.0 * nonzero / sum(params[n].numel() for n in names)


def forward_flops_per_image(model: nn.Module, image_size: int = 32) -> int:
    """FLOPs (2 x multiply-accumulates) of the backbone convs for one image of `image_size` pixels.

    Counted from the conv output shapes seen by hooks on one forward pass. BatchNorm, ReLU, pooling and
    the heads are left out (together well under 1 % of the total).
    """
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            total[0] += 2 * k * out.shape[1] * out.shape[2] * out.shape[3]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            p = next(model.parameters())
            model.features(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def build_model(num_tasks: int, classes_per_task: int, width: int = 64, stem_stride: int = 0,
                image_size: int = 32, seed: int | None = None) -> PreActResNet18:
    """Build the model; stem_stride 0 picks 1 for 32x32 inputs and 2 for larger ones. `seed` fixes the init."""
    stride = stem_stride or (1 if image_size <= 32 else 2)
    if seed is None:
        return PreActResNet18(num_tasks, classes_per_task, width, stride)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PreActResNet18(num_tasks, classes_per_task, width, stride)
