#!/bin/sh
# Builds .fp8attn/, the carry for bench/fp8_attention_probe.py on the device (no registry there).
# fa3-fwd's wheel (27.6 MB) is over what fits beside the repo, so its files travel as one xz
# archive (9.2 MB); the rest as wheels. Run here, in the repo root: sh bench/fp8_attention_wheels.sh
set -eu
PY=${PY:-/work/main/.venv/bin/python}
dir=.fp8attn tmp=$(mktemp -d)
mkdir -p "$dir"
get() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$1" "$2"
}
get "$tmp" fa3-fwd==0.0.3
(cd "$tmp" && "$PY" -m zipfile -e fa3_fwd-0.0.3-*.whl unpacked)
"$PY" - "$tmp/unpacked" "$dir/fa3_fwd-0.0.3.tar.xz" <<'PYEOF'
import lzma, sys, tarfile
src, dst = sys.argv[1:]
with tarfile.open(dst, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
    for name in ("fa3_fwd", "fa3_fwd_interface.py", "fa3_fwd_config.py"):
        tar.add(f"{src}/{name}", arcname=name)
PYEOF
get "$dir" sageattention==1.0.6
get "$dir" flash-attn-4==4.0.0b36  # carried only so the probe records its real import failure
cp /work/main/.whl/torchao-0.18.0-*.whl "$dir/" 2>/dev/null || get "$dir" torchao==0.18.0
rm -rf "$tmp"
ls -l "$dir" && du -sh "$dir"
