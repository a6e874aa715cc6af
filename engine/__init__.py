"""sd3serve's diffusion engine.

This package stays light: importing `engine` (or `engine.request`, `engine.config`,
`engine.scheduler`) never imports torch, so the API process can validate requests with it.
The torch-backed pieces live in `engine.engine`, `engine.runner`, `engine.attention`, ...
"""

from engine.request import GenerationRequest, RequestLimits, RequestValidationError, validate_request

__all__ = ["GenerationRequest", "RequestLimits", "RequestValidationError", "validate_request"]
