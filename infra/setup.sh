#!/usr/bin/env bash
# Creates both environments of the project (DESIGN section 3) beside the checkout:
#   .venv         main env: numpy 2, the `near` CLI, tests
#   .venv-render  render env: bpy 5.0.1, numpy<2, and this project's render_jobs package
# and records the render env's interpreter in the main env's configuration, so whatever spawns a render
# child finds it by configuration ($NEAR_RENDER_PYTHON overrides it, e.g. on a cluster node).
# Idempotent: re-running it updates both environments in place.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${NEAR_PYTHON:-python3.11}
main_env=${NEAR_MAIN_ENV:-$root/.venv}
render_env=${NEAR_RENDER_ENV:-$root/.venv-render}

"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "setup: need CPython 3.11 (bpy 5.0.1 requires it); set NEAR_PYTHON" >&2; exit 1; }

echo "setup: main env at $main_env"
"$python" -m venv "$main_env"
"$main_env/bin/python" -m pip install -q --upgrade pip==26.3
"$main_env/bin/python" -m pip install -q -e "$root[test]"

echo "setup: render env at $render_env"
"$python" -m venv "$render_env"
"$render_env/bin/python" -m pip install -q --upgrade pip==26.3
"$render_env/bin/python" -m pip install -q -r "$root/infra/render-requirements.txt"
"$render_env/bin/python" -m pip install -q --no-deps -e "$root"

mkdir -p "$main_env/etc"
printf 'render_python = "%s"\n' "$render_env/bin/python" > "$main_env/etc/near-factory.toml"
"$render_env/bin/python" -c 'import bpy, render_jobs; print("setup: render env ok, Blender", bpy.app.version_string)'
echo "setup: done. Activate with: source $main_env/bin/activate"
