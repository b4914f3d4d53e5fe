"""The README's code runs as written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import vensemble as ve

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_in_order():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    scope: dict[str, object] = {}
    for block in blocks:
        code = textwrap.dedent(block)
        if "# raises EnsembleError" in code:
            match = code.split("# raises EnsembleError: ", 1)[1].strip()
            with pytest.raises(ve.EnsembleError, match=re.escape(match)):
                exec(code, scope)
        else:
            exec(code, scope)
