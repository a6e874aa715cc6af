"""Registering a module-level handler whose parameters' types are built per app.

Some of what FastAPI reads from a handler's signature depends on the deployment: the request body
models are built from its `RequestLimits`, and the long-poll bound from its `max_wait`, so that
the OpenAPI schema shows what this server really accepts. `specialize` gives FastAPI a thin
wrapper of the handler whose signature carries those types; the handler itself stays one
importable function, and the wrapper holds nothing but the handler.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

Handler = TypeVar("Handler", bound=Callable[..., Any])


def specialize(handler: Handler, **annotations: Any) -> Handler:
    """`handler` as FastAPI should see it, with the named parameters' annotations replaced."""
    signature = inspect.signature(handler, eval_str=True)
    unknown = sorted(set(annotations) - set(signature.parameters))
    if unknown:
        raise ValueError(f"{handler.__name__} has no parameter(s) {', '.join(unknown)}; it has {', '.join(signature.parameters)}")
    parameters = [
        p.replace(annotation=annotations[p.name]) if p.name in annotations else p for p in signature.parameters.values()
    ]

    async def call_async(*args: Any, **kwargs: Any) -> Any:
        return await handler(*args, **kwargs)

    def call_sync(*args: Any, **kwargs: Any) -> Any:  # FastAPI runs it in its thread pool, like the handler
        return handler(*args, **kwargs)

    wrapper: Callable[..., Any] = call_async if inspect.iscoroutinefunction(handler) else call_sync
    functools.update_wrapper(wrapper, handler)  # the route's name (and so the operation id) stays the handler's
    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
