#!/bin/sh
# Starts one batching worker (one per GPU). Settings come from SD3SERVE_* variables
# (see worker/config.py and engine/config.py); extra arguments go to `sd3serve worker`.
set -eu
exec python -m sd3serve.cli worker "$@"
