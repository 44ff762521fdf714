#!/usr/bin/env bash
# Sourced by scripts/llt and scripts/test: make sure .venv exists with torch and llt (editable) installed.
# On a machine without a CUDA driver it installs the CPU torch wheel (torch==2.13.0) first, so that pip
# never resolves the multi-gigabyte CUDA wheels. Re-installs when pyproject.toml changes.
set -euo pipefail
LLT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LLT_VENV=${LLT_VENV:-$LLT_ROOT/.venv}
stamp=$LLT_VENV/.llt-installed
if [ ! -f "$stamp" ] || [ "$LLT_ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "[bootstrap] preparing $LLT_VENV (first use only)" >&2
    [ -x "$LLT_VENV/bin/python" ] || python3 -m venv "$LLT_VENV"
    pip=("$LLT_VENV/bin/python" -m pip install -q --disable-pip-version-check)
    if ! "$LLT_VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            "${pip[@]}" torch
        else
            "${pip[@]}" "torch==${LLT_CPU_TORCH:-2.13.0}"
        fi
    fi
    "${pip[@]}" -e "$LLT_ROOT[test]"
    touch "$stamp"
fi
