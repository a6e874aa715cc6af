#!/bin/sh
# Starts the API with uvicorn. Settings come from SD3SERVE_* variables (see api/config.py);
# extra arguments go to uvicorn. Run one process per container and scale containers: the
# Prometheus counters live in the process.
set -eu
exec python -m uvicorn "${SD3SERVE_API_APP:-api.app:app}" \
    --host "${SD3SERVE_API_HOST:-0.0.0.0}" \
    --port "${SD3SERVE_API_PORT:-8000}" \
    --proxy-headers --forwarded-allow-ips "${SD3SERVE_FORWARDED_ALLOW_IPS:-*}" \
    --no-server-header \
    "$@"
