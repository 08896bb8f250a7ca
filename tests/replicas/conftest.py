"""Tests that need two replicas: this package's process splits the CPU into 2 logical devices.

TensorFlow takes its device split once, before it runs anything, so this package runs in a pytest
process of its own (``make test`` runs it after the rest; ``tests/conftest.py`` leaves it out of
any run that also collects other tests). Every test shares the process's one Mirrored strategy
(``kd_tf2.engine.make_strategy``): two MirroredStrategy objects in one process would reuse each
other's collective instance keys.
"""
import pytest

from kd_tf2.engine import configure_cpu_replicas, make_strategy

REPLICAS = 2
configure_cpu_replicas(REPLICAS)  # before any test touches TensorFlow


@pytest.fixture(scope="session")
def mirrored():
  strategy = make_strategy("mirrored")
  assert strategy.num_replicas_in_sync == REPLICAS
  return strategy
