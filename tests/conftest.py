"""Shared set-up of the test suite.

``tests/replicas`` splits the CPU into two logical devices, which TensorFlow accepts only before
it starts: it is collected only by a pytest run that names nothing outside it
(``python -m pytest tests/replicas``; ``make test`` runs both).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_REPLICAS = os.path.join(ROOT, "tests", "replicas")


def _inside_replicas(arg):
  path = os.path.abspath(str(arg).split("::")[0])
  return path == _REPLICAS or path.startswith(_REPLICAS + os.sep)


def pytest_ignore_collect(collection_path, config):
  """Leave ``tests/replicas`` out of runs that also collect other tests."""
  if not _inside_replicas(collection_path):
    return None
  args = config.args or [os.getcwd()]
  return True if not all(_inside_replicas(a) for a in args) else None


def pytest_report_header(config):
  if not all(_inside_replicas(a) for a in (config.args or [os.getcwd()])):
    return "tests/replicas (2 logical CPUs) runs in its own process: python -m pytest tests/replicas"
  return None


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a test of a minute or more (CI runs it too)")
