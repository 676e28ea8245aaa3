#!/usr/bin/env bash
# The GPU extras, into .venv after `make setup`, on a Linux machine with NVIDIA GPUs:
#   deepspeed (ZeRO), bitsandbytes (QLoRA), and flash-attn built against the installed torch.
# torch itself comes from `make setup`: torch 2.13.0 from PyPI is a CUDA build on Linux x86_64
# (for another CUDA version: make setup TORCH_PIP_ARGS="--index-url <PyTorch's index for it>").
# flash-attn builds from source unless a prebuilt wheel matches this torch, CUDA and Python: it
# needs the CUDA toolkit's nvcc (the CUDA major version torch was built with) and takes a while;
# MAX_JOBS bounds the compiler processes (each can take several GB of memory).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"

"$PY" - <<'PY'
import sys
import torch
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a CPU build: install a CUDA build first "
             "(make setup TORCH_PIP_ARGS=... as the README's GPU section says)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs visible: {torch.cuda.device_count()}")
PY
"$PY" -m pip install -e ".[deepspeed,quant]"
"$PY" -m pip install packaging ninja
MAX_JOBS="${MAX_JOBS:-4}" "$PY" -m pip install --no-build-isolation "flash-attn==2.8.3.post2"
"$PY" -c "import deepspeed, bitsandbytes, flash_attn; print('deepspeed', deepspeed.__version__, '| bitsandbytes', bitsandbytes.__version__, '| flash-attn', flash_attn.__version__)"
