# Source on the device machine with .fp8engine carried (bench/fp8_engine_carry.sh builds it):
# unpacks fa3-fwd and the other packages into /tmp/site; checks that FP8 attention can run.
#   source bench/fp8_engine_setup.sh
python3 -m tarfile -e .fp8engine/fa3_fwd-0.0.3.tar.xz /tmp/site || return 1
python3 -m tarfile -e .fp8engine/site-packages.tar.xz /tmp/site || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "
import torch, diffusers, torchao, fa3_fwd_interface
from engine.fp8_attention import fp8_attention_missing
missing = fp8_attention_missing(torch.device('cuda'))
print('device ok:', torch.__version__, torch.cuda.get_device_name(0), diffusers.__version__, torchao.__version__, missing or 'fp8 attention ready')
assert not missing, missing
" || return 1
