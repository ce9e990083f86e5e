#!/usr/bin/env bash
# Download, on a machine with network access, the wheels that benchmarks/gpu_check.sh and gpu_suite.sh install
# on a GPU machine without it: ldmflow's dependencies other than torch and the Snakemake workflow's (the suite
# and the gpu-marked tests import no Snakemake), diffusers (the suite's baselines) and pytest, for CPython 3.12
# on x86-64 Linux (pure-python and cp312 manylinux wheels). Carry the folder along with the working tree.
#
#   bash benchmarks/gpu_wheels.sh [--dest DIR] [--python-version 3.12] [--have NAME,NAME,...]
#
# --have: distributions the GPU machine already has (e.g. numpy,pandas,pillow,matplotlib): their wheels are
# removed after the download, which keeps the folder small (a folder carried to a lent device machine counts
# against its 64 MiB). Everything, for a machine with torch alone: about 120 MB; zarr (and numcodecs) may be
# left out with --have zarr,numcodecs,...: the suite then skips its embedding case with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
pyver=3.12
have=""
while (($#)); do
    case $1 in
        --dest) dest=$2; shift 2 ;;
        --python-version) pyver=$2; shift 2 ;;
        --have) have=$2; shift 2 ;;
        *) echo "gpu_wheels.sh: unknown option $1 (see the top of this script)" >&2; exit 2 ;;
    esac
done
py=${PYTHON:-python3}

# [project] dependencies of pyproject.toml, less torch and Snakemake with its executor plugins
mapfile -t deps < <("$py" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for d in deps:
    name = re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower()
    if name != "torch" and not name.startswith("snakemake"):
        print(d)
PY
)
extras=("diffusers==0.42.1" "pytest>=8" "hypothesis>=6.100")

mkdir -p "$dest"
"$py" -m pip download --quiet --dest "$dest" --only-binary=:all: --implementation cp --python-version "$pyver" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 "${deps[@]}" "${extras[@]}"

# what the GPU machine has, and anything pulling in torch or CUDA (the machine's own torch stays)
IFS=, read -r -a drop <<<"$have,torch,triton,nvidia-*,cuda-*"
for name in "${drop[@]}"; do
    [[ -n $name ]] || continue
    norm=$(tr '[:upper:]-' '[:lower:]_' <<<"$name")
    find "$dest" -maxdepth 1 -iname "${norm}-*.whl" -print -delete | sed 's/^/dropped (--have): /'
done
echo "gpu_wheels.sh: $(find "$dest" -maxdepth 1 -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
