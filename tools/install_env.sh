#!/usr/bin/env bash
# Creates (or reuses) the project's Python environment and installs everything into it from
# the package registries alone. Usage: tools/install_env.sh VENV_DIR
#
# - An environment that already has torch + torchvision keeps them.
# - An environment that already has detectron2 (v0.6, main, editable or not) keeps it untouched;
#   only what it needs around it is added (a setuptools that still has pkg_resources).
# - Otherwise detectron2 v0.6 is installed from the registry's pb1-detectron2 sdist, repackaged
#   as a distribution named "detectron2" (tools/detectron2_dist/setup.py).
set -euo pipefail
venv="${1:?usage: install_env.sh VENV_DIR}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="$root/.cache"
torch_pins=(torch==2.14.1 torchvision==0.29.1)

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)
quiet() { grep -v "^WARNING: Location .* is ignored" || true; }

if ! "$py" -c "import torch, torchvision.ops; torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)" 2>/dev/null; then
    echo "[env] installing ${torch_pins[*]}"
    "${pip[@]}" "${torch_pins[@]}" 2>&1 | quiet
fi

# Any detectron2 already importable is kept as it is; the fallback below only fills in
# detectron2._C where its compiled module is missing or fails to load.
if "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('detectron2') is None)"; then
    echo "[env] keeping the detectron2 already installed"
else
    echo "[env] installing detectron2 v0.6 from the pb1-detectron2 sdist"
    mkdir -p "$cache"
    sdist="$cache/pb1-detectron2-0.6.tar.gz"
    [ -f "$sdist" ] || "$py" -m pip download --quiet --no-deps --no-build-isolation \
        pb1-detectron2==0.6 -d "$cache" 2>&1 | quiet
    src="$cache/detectron2-0.6-src"
    rm -rf "$src" && mkdir -p "$src"
    tar -xzf "$sdist" -C "$src" --strip-components=1 pb1-detectron2-0.6/detectron2 \
        pb1-detectron2-0.6/projects/PointRend pb1-detectron2-0.6/projects/DeepLab \
        pb1-detectron2-0.6/projects/Panoptic-DeepLab
    cp "$root/tools/detectron2_dist/setup.py" "$src/setup.py"
    "${pip[@]}" "$src" 2>&1 | quiet
    rm -rf "$src"
fi

# From here on pip may add packages but never move torch, torchvision or detectron2.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$py" - >"$constraints" <<'PY'
import importlib.metadata as md
for name in ("torch", "torchvision", "detectron2"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
pip+=(--constraint "$constraints")

# detectron2's model_zoo imports pkg_resources (v0.6 and main); setuptools 82 dropped it.
if ! "$py" -c "import pkg_resources" 2>/dev/null; then
    echo "[env] pkg_resources is missing (setuptools>=82): installing setuptools<81"
    "${pip[@]}" "setuptools<81" 2>&1 | quiet
fi

# The compiled-ops fallback is an ordinary (non-editable) install: it ships a .pth file.
"${pip[@]}" --no-deps --force-reinstall "$root/csrc_fallback" 2>&1 | quiet
"${pip[@]}" -e "$root[dev,export]" 2>&1 | quiet

# PointRend mixing needs detectron2's projects/, which a bare copy of detectron2/ lacks.
if ! "$py" -c "import importlib.util as u, sys
sys.exit(u.find_spec('detectron2.projects.point_rend') is None)" 2>/dev/null; then
    echo "[env] note: detectron2.projects.point_rend is not importable (detectron2 installed" \
        "without projects/); kept as is, but tests/test_mixing.py needs it"
fi
echo "[env] ready: $venv"
