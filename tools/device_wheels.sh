#!/usr/bin/env bash
# Wheels the device machine's image lacks (its python3 is 3.12 and reaches no registry), into
# .whl/ for the device tool's `carry` (see /work/.library/device/README.md, Notes):
#   bash tools/device_wheels.sh            # here, once
#   device run: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#       --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && \
#       python3 tools/gpu_check.py --out $OUT
# The list: tessera's runtime dependencies missing from that image (KINDS.md's package list),
# then what the suite's server tests import (the official openai client and its needs), then
# exllamav2 for gpu_check's cross-check (pure Python: it builds its extension with the image's
# nvcc and ninja at first import). Of exllamav2's requirements the image lacks only fastparquet
# and websockets, which only its converter (conversion/tokenize.py) and server import: not carried.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
PKGS=(
  annotated-types==0.8.0 cffi==2.1.1 distro==1.9.0 exllamav2==0.3.2 gguf==0.19.0 jiter==0.19.0 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 llguidance==1.6.1 msgspec==0.23.0 openai==3.60.0
  pycparser==3.12 pydantic==2.14.4 pydantic-core==2.50.5 referencing==0.37.0 rpds-py==2026.9.1
  sniffio==1.3.1 starlette==1.10.0 typing-inspection==0.4.5 uvicorn==0.55.0
)
rm -rf .whl && mkdir .whl
for p in "${PKGS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$p"
done
du -sh .whl
