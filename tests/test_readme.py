"""Every ```python block of README.md and docs/OWN_MODEL.md runs (issue 11 item 6): a snippet that
stops working fails this test instead of rotting. A file's blocks run in order in one namespace
(a later block may use an earlier block's names), in a scratch working directory."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", os.path.join("docs", "OWN_MODEL.md"))
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path):
  with open(os.path.join(ROOT, path)) as f:
    return _BLOCK.findall(f.read())


def test_the_docs_have_python_blocks():
  assert len(python_blocks("README.md")) >= 2
  assert len(python_blocks(DOCS[1])) >= 3


@pytest.mark.parametrize("path", DOCS)
def test_every_python_block_runs(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__readme__"}
  for i, block in enumerate(python_blocks(path)):
    code = compile(block, f"{path} python block {i + 1}", "exec")
    exec(code, namespace)  # pylint: disable=exec-used
