"""The CIFAR teacher/student zoo of RepDistiller (Tian et al., ICLR 2020, arXiv:1910.10699) in Keras,
plus the ImageNet nets of the distillation literature (torchvision ResNets, MobileNetV1).

``nets.create(name, num_classes)`` builds a net; ``model(x, training=...)`` returns logits and
``model(x, training=..., features=True)`` returns ``nets.Outputs`` (DESIGN.md contract 1, NETS.md).
``nets.load_reference_weights(model, state)`` imports a RepDistiller PyTorch state_dict.
"""
from nets.outputs import Outputs
from nets.registry import available, canonical_name, create, register
from nets.weights import load_reference_weights, read_state, reference_state

# Importing the family modules registers their names.
# pylint: disable=wrong-import-position
from nets import (resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenetv1,  # noqa: F401
                  shufflenetv2, imagenet, ensembles, exits)

__all__ = ["Outputs", "available", "canonical_name", "create", "register",
           "load_reference_weights", "read_state", "reference_state"]
