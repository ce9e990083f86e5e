#!/usr/bin/env bash
# The whole same-work speed comparison in one command (benchmarks/suite.py; what each comparison does is
# in benchmarks/same_work.py). Needs python3 with torch; what else it needs (diffusers, pyyaml, numpy, pandas,
# pillow, jsonschema; zarr for the embedding case) it installs without the network, when missing, from the
# wheels folder made by benchmarks/gpu_wheels.sh on a machine with network access (default .whl/ of this
# checkout, git-ignored; LDMFLOW_WHEELS names another), under a prefix of its own (LDMFLOW_SITE, default
# /tmp/ldmflow-site) put on PYTHONPATH: the system's Python stays untouched (an "externally managed" Python,
# PEP 668, refuses a plain pip install), and what it already has (torch, numpy, ...) is used, not reinstalled.
# Without zarr the embedding case is written as skipped, with a note, and the others run.
#
# On a CUDA machine it runs the realistic scale (unet128_d4, 32x32x4 latents, batches 64 and 256, eager
# fp32 / bf16 / compile / CUDA graphs on both sides): no case starts after 5.5 minutes and a case still
# running at 7 min 10 s is stopped (both counted from this script's start), so that it ends within 8
# minutes; the cases run eager first, so the compile and CUDA-graph ones are those cut when time is short.
# On a CPU-only machine it runs the reduced scale, as CI does.
#
#   bash benchmarks/gpu_suite.sh [OUT.jsonl] [extra suite.py options, e.g. --budget-s 420 or --cases embedding]
set -euo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/suite-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
shift || true
py=${PYTHON:-python3}
wheels=${LDMFLOW_WHEELS:-.whl}
site=${LDMFLOW_SITE:-/tmp/ldmflow-site}
# the prefix's package folders (Debian's Python installs under PREFIX/local/lib/python3.X/dist-packages)
site_dirs() { find "$site" -maxdepth 5 -type d \( -name site-packages -o -name dist-packages \) 2>/dev/null | paste -sd:; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[[ -n $(site_dirs) ]] && export PYTHONPATH="$PYTHONPATH:$(site_dirs)"  # an earlier run's installs

# distribution:module; zarr is optional (the embedding case alone uses it)
required=(diffusers:diffusers pyyaml:yaml numpy:numpy pandas:pandas pillow:PIL jsonschema:jsonschema)
optional=(zarr:zarr)
missing_of() { for spec in "$@"; do "$py" -c "import ${spec##*:}" 2>/dev/null || echo "${spec%%:*}"; done; }
mapfile -t missing < <(missing_of "${required[@]}" "${optional[@]}")
if ((${#missing[@]})) && [[ -d $wheels ]]; then
    echo "gpu_suite.sh: installing from $wheels into $site: ${missing[*]}"
    # one name at a time: a wheel missing from the folder (zarr left out) must not stop the others
    for name in "${missing[@]}"; do
        "$py" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
            --prefix "$site" "$name" || echo "gpu_suite.sh: could not install $name from $wheels" >&2
    done
    [[ -n $(site_dirs) ]] && export PYTHONPATH="$PYTHONPATH:$(site_dirs)"
fi
mapfile -t still < <(missing_of "${required[@]}")
if ((${#still[@]})); then
    echo "gpu_suite.sh: ${still[*]} missing and not in ${wheels}/: make the folder with" \
        "'bash benchmarks/gpu_wheels.sh' on a machine with network access and carry it here" >&2
    exit 2
fi
if [[ -n $(missing_of "${optional[@]}") ]]; then
    echo "gpu_suite.sh: note: zarr is not installed, so the embedding case is skipped (add zarr to $wheels/)"
fi

# inductor's caches in the checkout: a second run on the same machine skips most compilation
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/benchmarks/results/inductor-cache}
# --since: the installs and imports count against the suite's time budget and hard limit
"$py" benchmarks/suite.py --out "$out" --since "$start" "$@"
echo "gpu_suite.sh: $(($(date +%s) - start)) s in all; records in $out"
