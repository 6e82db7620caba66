"""Arrow as the data path uses it: ``from hermes_orchestration.arrow import pa, pc``.

The first time pyarrow converts Python values (``pa.array``), it imports pandas to check whether
they are pandas objects: 0.2 s and 40 MB in every sync process, for a library nothing here uses.
That first check is made here with pandas out of sight, so pyarrow goes on without it; asked to
convert to pandas later (``to_pandas``), it imports pandas then.

Arrow's allocator is chosen in the package's ``__init__``, before pyarrow is first imported.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["pa", "pc"]


class _HidePandas(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == "pandas":
            raise ImportError("pandas is not used by the sync")
        return None


def _first_conversion_without_pandas() -> None:
    if "pandas" in sys.modules:  # already imported by someone else: nothing left to save
        return
    finder = _HidePandas()
    sys.meta_path.insert(0, finder)
    try:
        # A value whose type is inferred: that path makes both of pyarrow's checks for pandas.
        pa.array([""])
    finally:
        sys.meta_path.remove(finder)


_first_conversion_without_pandas()
