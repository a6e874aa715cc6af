"""The `sd3serve` command line: `generate`, `worker`, `up`."""
