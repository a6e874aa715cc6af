"""Field types of the request models that are built from tuples at run time.

`create_model` takes a field's type as a value; a `Literal` of a tuple variable (the output
formats, the cache policies) is valid there but not a type mypy can check, so these helpers
build it and hand it over as Any: one place for what the type checker cannot see.
"""

from __future__ import annotations

from typing import Any, Literal


def one_of(values: tuple[str, ...]) -> Any:
    """`Literal[values]`: a string that is one of `values` (an enum in the OpenAPI schema)."""
    return Literal[values]


def list_of(item: Any) -> Any:
    """`list[item]`, for an item type built at run time."""
    return list[item]
