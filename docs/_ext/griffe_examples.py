"""Griffe extension for the API pages: read a Google-style ``Example:`` section as ``Examples:``.

The package's docstrings follow Lightning's convention (``Example:``), which griffe would render as a
prose admonition; as an examples section its doctest lines are shown as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
