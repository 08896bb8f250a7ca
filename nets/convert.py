"""Turn a RepDistiller or torchvision PyTorch state dict into a Keras ``.keras`` file (NETS.md §4).

  python -m nets.convert IN.(pth|pt|npz) OUT.keras --arch NAME [--num_classes N] [--trust_pickle]

``num_classes`` defaults to the row count of the state dict's classifier weight. A ``.pth`` needs
torch installed; an ``.npz`` holds the state dict's arrays under their PyTorch keys. torchvision's
ResNet files (e.g. ``resnet34-b627a593.pth``) load into ``resnet{18,34,50}_imagenet``.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position

from nets.registry import create  # pylint: disable=wrong-import-position
from nets.weights import clean_state, load_reference_weights, read_state  # pylint: disable=wrong-import-position


def classifier_key(arch):
  """The state_dict key of ``arch``'s classifier weight (e.g. 'fc.weight', 'classifier.0.weight')."""
  probe = create(arch, num_classes=1)  # constructing (not building) a net is cheap
  for path, layer in probe.torch_layers():
    if layer is probe.classifier:
      return f"{path}.weight"
  raise ValueError(f"{arch} has no classifier in its state_dict table")


def convert(in_path, out_path, arch, num_classes=None, trust_pickle=False):
  """Read ``in_path``, build ``arch``, load the weights, save to ``out_path``; returns the model."""
  if not out_path.endswith(".keras"):
    raise ValueError(f"output file must end in .keras, got {out_path!r}")
  state = clean_state(read_state(in_path, trust_pickle=trust_pickle))
  if num_classes is None:
    key = classifier_key(arch)
    if key not in state:
      raise ValueError(f"cannot infer num_classes: {in_path} has no key {key!r}; "
                       "pass --num_classes or check --arch")
    num_classes = int(np.shape(state[key])[0])
  model = create(arch, num_classes=num_classes)
  load_reference_weights(model, state)
  model.save(out_path)
  return model


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m nets.convert", description=__doc__.split("\n")[0])
  parser.add_argument("input", help="state dict: .pth/.pt (needs torch) or .npz")
  parser.add_argument("output", help="Keras model file, .keras")
  parser.add_argument("--arch", required=True, help="zoo name, e.g. resnet32x4, wrn_40_2, vgg13, resnet34_imagenet")
  parser.add_argument("--num_classes", type=int, default=None,
                      help="default: inferred from the classifier weight")
  parser.add_argument("--trust_pickle", action="store_true",
                      help="fully unpickle a .pth that holds more than tensors (trusted files only)")
  args = parser.parse_args(argv)
  try:
    model = convert(args.input, args.output, args.arch, args.num_classes, args.trust_pickle)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.output}: {model.arch}, {model.num_classes} classes, "
        f"{model.count_params():,} weights")
  return 0


if __name__ == "__main__":
  sys.exit(main())
