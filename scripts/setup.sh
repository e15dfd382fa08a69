#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv, or $FASTDLLM_VENV) and install fastdllm into it.
# Idempotent: a second run with an unchanged pyproject.toml does nothing. Sourced by demo.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTDLLM_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# torch first, and the CPU build on a machine without a GPU: a plain `pip install torch` pulls several GB of CUDA
# wheels. A CPU wheel in pip's find-links is used when there is one; else the CPU index (FASTDLLM_TORCH_INDEX).
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] installing torch (CUDA)"
    "${pip[@]}" install torch
  else
    cpu_wheel=""
    for d in $("$venv/bin/python" -m pip config get global.find-links 2>/dev/null) ${PIP_FIND_LINKS:-}; do
      w=$(ls "$d"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
      [ -n "$w" ] && cpu_wheel="$w"
    done
    if [ -n "$cpu_wheel" ]; then
      version=$(basename "$cpu_wheel" | cut -d- -f2 | cut -d+ -f1)
      echo "[setup] installing torch==$version (CPU build from $(dirname "$cpu_wheel"))"
      "${pip[@]}" install "torch==$version"
    else
      echo "[setup] installing torch (CPU build)"
      "${pip[@]}" install torch --index-url "${FASTDLLM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
  fi
fi

stamp="$venv/.fastdllm-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # uv resolves and installs the ~150 dependencies in seconds where pip 23's resolver spends minutes filtering
  # the version lists of packages with thousands of releases (boto3, botocore). uv comes from PyPI as one wheel;
  # torch is already in the venv (above), so uv keeps it and never fetches a CUDA build. FASTDLLM_NO_UV=1, or no
  # uv to be had, installs with plain pip instead.
  uv=""
  if [ "${FASTDLLM_NO_UV:-0}" != "1" ]; then
    if command -v uv >/dev/null 2>&1; then
      uv=$(command -v uv)
    elif [ -x "$venv/bin/uv" ] || "${pip[@]}" install uv >/dev/null 2>&1; then
      uv="$venv/bin/uv"
    fi
  fi
  if [ -n "$uv" ]; then
    echo "[setup] installing fastdllm and its dependencies into $venv (uv)"
    links=()
    for d in $("$venv/bin/python" -m pip config get global.find-links 2>/dev/null) ${PIP_FIND_LINKS:-}; do
      [ -d "$d" ] && links+=(--find-links "$d")
    done
    # --compile-bytecode: pip writes .pyc files at install, uv does not; where PYTHONDONTWRITEBYTECODE is set (as
    # on this project's machines) every process would otherwise compile torch, transformers and ray anew (~5 s
    # for each Ray worker and CLI start here).
    "$uv" pip install -q --compile-bytecode --python "$venv/bin/python" "${links[@]}" -e "$root[test,plot]" || {
      echo "[setup] uv could not install them (see above); installing with pip"
      "${pip[@]}" install -e "$root[test,plot]"
    }
  else
    echo "[setup] installing fastdllm and its dependencies into $venv (pip)"
    "${pip[@]}" install -e "$root[test,plot]"
  fi
  echo "$want" > "$stamp"
fi
