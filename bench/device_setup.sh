# Source on the device machine (no registry there): installs the carried wheels (.whl) into
# /tmp/site and unpacks the carried Debian redis-server (.redis-deb) into /tmp/redis.
#   source bench/device_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/redis && for f in .redis-deb/*.deb; do dpkg -x "$f" /tmp/redis; done
if /tmp/redis/usr/bin/redis-server --version >/dev/null 2>&1; then
  export SD3SERVE_REDIS_SERVER=/tmp/redis/usr/bin/redis-server
else  # libraries the device image lacks come from the unpacked packages
  printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:/tmp/redis/lib/x86_64-linux-gnu exec /tmp/redis/usr/bin/redis-server "$@"\n' > /tmp/redis/redis-server.sh
  chmod +x /tmp/redis/redis-server.sh && export SD3SERVE_REDIS_SERVER=/tmp/redis/redis-server.sh
fi
$SD3SERVE_REDIS_SERVER --version || return 1
python3 -c "import diffusers, fastapi, rq, uvicorn, redis, pynvml, torch; print('device ok:', torch.__version__, torch.cuda.get_device_name(0), diffusers.__version__, rq.__version__)" || return 1
