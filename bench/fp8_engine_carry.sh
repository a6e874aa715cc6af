#!/bin/sh
# Builds .fp8engine/, the one carry for measuring FP8 attention in the engine on the device
# (bench.engine_bench --fp8-attention and the GPU tests): fa3-fwd's files (xz archive, from
# .fp8attn/, built by bench/fp8_attention_wheels.sh when missing), torchao (FP8 linears),
# diffusers, einops and pytest with its dependencies, taken from .whl/. 20.7 MB: with the repo
# (44.5 MB) 65.3 MB, under the 64 MiB (67.1 MB) a device call carries; .whl + .fp8attn (30 MB) is not.
# Run here, in the repo root: sh bench/fp8_engine_carry.sh   (then carry [".fp8engine"])
set -eu
WHL=${WHL:-.whl}
[ -d "$WHL" ] || WHL=/work/main/.whl
[ -f .fp8attn/fa3_fwd-0.0.3.tar.xz ] || sh bench/fp8_attention_wheels.sh
dir=.fp8engine
rm -rf "$dir" && mkdir -p "$dir"
cp .fp8attn/fa3_fwd-0.0.3.tar.xz .fp8attn/torchao-0.18.0-*.whl "$dir/"
for name in diffusers einops pytest pytest_timeout pluggy iniconfig pygments; do
  cp "$WHL"/"$name"-[0-9]*.whl "$dir/"
done
ls -l "$dir" && du -sh "$dir"
