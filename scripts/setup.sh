#!/usr/bin/env bash
# Create .venv and install fm-policy (editable) with the given extras, e.g. `bash scripts/setup.sh pusht,dev`.
#
# CPU machines (the default): constraints/cpu.txt pins torch to the CPU wheel, so pip never pulls the multi-GB CUDA
# build. On a GPU machine run with FM_POLICY_GPU=1 to skip the CPU constraint and get the CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-pusht,dev}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
constraints=(-c constraints/cpu.txt)
[ "${FM_POLICY_GPU:-0}" = "1" ] && constraints=()
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${constraints[@]}" -e ".[${extras}]"
# robomimic 0.3.0 declares torchvision as a dependency; the torchvision on PyPI is a CUDA build that fails to load
# with the CPU torch and then breaks `diffusers` imports. So the `robomimic` extra lists only the dependencies robomimic
# actually uses, and robomimic itself is installed here without its declared dependencies.
if [[ ",${extras}," == *",robomimic,"* ]]; then
  .venv/bin/python -m pip install -q "${constraints[@]}" --no-deps robomimic==0.3.0
fi
# openpi-client 0.1.2 declares numpy<2 but runs on numpy 2; the dev extra lists what it uses (see pyproject.toml)
if [[ ",${extras}," == *",dev,"* ]]; then
  .venv/bin/python -m pip install -q "${constraints[@]}" --no-deps openpi-client==0.1.2
fi
echo "fm-policy installed in .venv with extras [${extras}]; activate with: . .venv/bin/activate"
