"""Reading typed settings from SD3SERVE_* environment variables (shared with the engine)."""
from engine.settings import env_values, parse_value

__all__ = ["env_values", "parse_value"]
