"""Models: the CIFAR PreAct-ResNet-18 with two branches of per-task heads."""

from llt.models.preact_resnet import (PreActResNet18, build_model, conv_weight_names, count_conv_weights,
                                      forward_flops_per_image, remaining_weights)

__all__ = ["PreActResNet18", "build_model", "conv_weight_names", "count_conv_weights",
           "forward_flops_per_image", "remaining_weights"]
