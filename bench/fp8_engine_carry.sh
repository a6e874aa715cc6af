#!/bin/sh
# Builds .fp8engine/, the one carry for measuring FP8 attention in the engine on the device
# (bench.engine_bench --fp8-attention and the GPU tests): fa3-fwd's files (xz archive, from
# .fp8attn/, built by bench/fp8_attention_wheels.sh when missing) and, unpacked into one more xz
# archive, torchao (FP8 linears), diffusers, einops and pytest with its dependencies from .whl/.
# As wheels they came to 20.7 MB, which beside the tracked tree (47.8 MB) is over the 64 MiB
# (67.1 MB) a device call carries; unpacked and xz'd they take about half.
# Run here, in the repo root: sh bench/fp8_engine_carry.sh   (then carry [".fp8engine"])
set -eu
WHL=${WHL:-.whl}
[ -d "$WHL" ] || WHL=/work/main/.whl
PY=${PY:-python3}
[ -f .fp8attn/fa3_fwd-0.0.3.tar.xz ] || sh bench/fp8_attention_wheels.sh
dir=.fp8engine tmp=$(mktemp -d)
rm -rf "$dir" && mkdir -p "$dir" "$tmp/site"
cp .fp8attn/fa3_fwd-0.0.3.tar.xz "$dir/"
for wheel in .fp8attn/torchao-0.18.0-*.whl; do "$PY" -m zipfile -e "$wheel" "$tmp/site"; done
for name in diffusers einops pytest pytest_timeout pluggy iniconfig pygments; do
  "$PY" -m zipfile -e "$(ls "$WHL"/"$name"-[0-9]*.whl | head -1)" "$tmp/site"
done
find "$tmp/site" -name __pycache__ -prune -exec rm -rf {} +
"$PY" - "$tmp/site" "$dir/site-packages.tar.xz" <<'PYEOF'
import lzma, os, sys, tarfile
src, dst = sys.argv[1:]
with tarfile.open(dst, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
    for name in sorted(os.listdir(src)):
        tar.add(os.path.join(src, name), arcname=name)
PYEOF
rm -rf "$tmp"
ls -l "$dir" && du -sh "$dir"
