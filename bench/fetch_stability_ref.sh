#!/usr/bin/env bash
# Copies Stability AI's SD3 reference sampler (github Stability-AI/sd3.5) from a local git mirror or
# checkout into the git-ignored .vendor/sd3.5/, for bench/stability_part.py. It is not our code and is
# never committed; the folder travels to the device (carry `.vendor`).
#   bash bench/fetch_stability_ref.sh /path/to/sd3.5(.git) [commit] [dest]
# mmditx.py, sd3_impls.py and other_impls.py are the sampler; sd3_impls.py also imports
# dit_embedder.py (ControlNet), so that one comes too. COMMIT records where they came from.
set -euo pipefail
src=${1:?"usage: $0 MIRROR_OR_CHECKOUT [COMMIT] [DEST]"}
rev=${2:-HEAD}
dest=${3:-"$(cd "$(dirname "$0")/.." && pwd)/.vendor/sd3.5"}
files=(mmditx.py sd3_impls.py other_impls.py dit_embedder.py LICENSE-CODE)
commit=$(git --git-dir="$(git -C "$src" rev-parse --absolute-git-dir)" rev-parse --verify "$rev^{commit}") \
  || { echo "error: $src is not a git mirror or checkout with revision $rev" >&2; exit 1; }
mkdir -p "$dest"
for f in "${files[@]}"; do
  git -C "$src" show "$commit:$f" > "$dest/$f.tmp" || { echo "error: $f not in $src at $commit" >&2; rm -f "$dest/$f.tmp"; exit 1; }
  mv "$dest/$f.tmp" "$dest/$f"
done
printf 'Stability-AI/sd3.5 %s\n' "$commit" > "$dest/COMMIT"
echo "copied ${files[*]} at $commit into $dest"
