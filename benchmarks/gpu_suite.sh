#!/usr/bin/env bash
# The whole same-work speed comparison in one command (benchmarks/suite.py; what each comparison does is
# in benchmarks/same_work.py). Needs Python with torch; everything else it installs, without the network,
# from the wheels in .whl/ of this checkout when they are missing. Populate .whl/ beforehand on a machine
# with network access, for the GPU machine's Python version (here 3.11; adjust --python-version):
#
#   pip download --dest .whl --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       diffusers==0.42.1 pyyaml numpy pandas 'zarr>=3,<4' pillow jsonschema
#
# (about 62 MB, 45 MB without numpy, which a machine with torch usually has; .whl/ is git-ignored: carry it
# along with the working tree.)
#
# On a CUDA machine it runs the realistic scale (unet128_d4, 32x32x4 latents, batches 64 and 256, eager
# fp32 / bf16 / compile / CUDA graphs on both sides): no case starts after 5.5 minutes and a case still
# running at 7 min 10 s is stopped (both counted from this script's start), so that it ends within 8
# minutes; the cases run eager first, so the compile and CUDA-graph ones are those cut when time is short.
# On a CPU-only machine it runs the reduced scale, as CI does.
#
#   bash benchmarks/gpu_suite.sh [OUT.jsonl] [extra suite.py options, e.g. --budget-s 420]
set -euo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/suite-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
shift || true
py=${PYTHON:-python}

missing=()
for spec in diffusers==0.42.1:diffusers pyyaml:yaml numpy:numpy pandas:pandas "zarr>=3,<4":zarr pillow:PIL \
    jsonschema:jsonschema; do
    "$py" -c "import ${spec##*:}" 2>/dev/null || missing+=("${spec%:*}")
done
if ((${#missing[@]})); then
    if [[ ! -d .whl ]]; then
        echo "gpu_suite.sh: ${missing[*]} missing and no .whl/ folder to install from (see the pip download" \
            "step at the top of this script)" >&2
        exit 2
    fi
    echo "installing from .whl/: ${missing[*]}"
    "$py" -m pip install --quiet --no-index --find-links .whl "${missing[@]}"
fi

# inductor's caches in the checkout: a second run on the same machine skips most compilation
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/benchmarks/results/inductor-cache}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# --since: the installs and imports count against the suite's time budget and hard limit
"$py" benchmarks/suite.py --out "$out" --since "$start" "$@"
echo "gpu_suite.sh: $(($(date +%s) - start)) s in all; records in $out"
