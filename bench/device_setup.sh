# Source on the device machine (no registry there): installs the carried wheels (.whl) into
# /tmp/site and unpacks the carried Debian redis-server (.redis-deb) into /tmp/redis.
#   source bench/device_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .redis-deb/*.deb >/dev/null 2>&1; then  # carried for serving calls only
  mkdir -p /tmp/redis && for f in .redis-deb/*.deb; do dpkg -x "$f" /tmp/redis; done
  if /tmp/redis/usr/bin/redis-server --version >/dev/null 2>&1; then
    export SD3SERVE_REDIS_SERVER=/tmp/redis/usr/bin/redis-server
  else  # libraries the device image lacks come from the unpacked packages
    printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:/tmp/redis/lib/x86_64-linux-gnu exec /tmp/redis/usr/bin/redis-server "$@"\n' > /tmp/redis/redis-server.sh
    chmod +x /tmp/redis/redis-server.sh && export SD3SERVE_REDIS_SERVER=/tmp/redis/redis-server.sh
  fi
  $SD3SERVE_REDIS_SERVER --version || return 1
else
  echo "no .redis-deb carried: no redis-server (engine benchmarks only)"
fi
python3 -c "import diffusers, fastapi, rq, uvicorn, redis, pynvml, torch; print('device ok:', torch.__version__, torch.cuda.get_device_name(0), diffusers.__version__, rq.__version__)" || return 1
# One step of a device call: `device_step NAME CMD...` runs CMD with what is left of the call
# (`DEVICE_CALL_END`, default 590 s after the call began, minus 10 s to copy), its output in
# $OUT/NAME.log; a step with under 30 s left is skipped, so a cut call still returns its files.
# Result files that merge across calls (serving_h200.json, engine_h200.json) are copied into
# $OUT first: rows are rewritten there as they complete.
device_step() {
  local name=$1 left=$(( ${DEVICE_CALL_END:-590} - 10 - SECONDS ))
  shift
  if [ "$left" -lt 30 ]; then echo "skip $name: ${left} s left"; return 0; fi
  timeout "$left" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? at ${SECONDS} s"
}
for f in bench/results/serving_h200.json bench/results/engine_h200.json; do
  [ -n "$OUT" ] && [ -f "$f" ] && cp "$f" "$OUT/"
done
mkdir -p "${OUT:-/tmp}/logs"
