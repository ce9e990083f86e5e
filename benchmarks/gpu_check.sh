#!/usr/bin/env bash
# Everything to run on a GPU machine, in one command: the same-work speed suite (gpu_suite.sh, which installs
# what is missing from the wheels of benchmarks/gpu_wheels.sh), then the `gpu`-marked tests, the 2-GPU DDP
# smoke test among them (skipped where fewer than two GPUs are visible). Writes nvidia-smi's report, the
# suite's records and both logs to OUT_DIR; exits non-zero when the suite or a test failed.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [extra suite.py options, e.g. --budget-s 240]
#
# Built to end within 10 minutes: the suite stops itself by 7 min 10 s (gpu_suite.sh); the tests train tiny models.
set -uo pipefail
cd "$(dirname "$0")/.."
outdir=${1:-benchmarks/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
shift || true
mkdir -p "$outdir"
py=${PYTHON:-python3}
wheels=${LDMFLOW_WHEELS:-.whl}
site=${LDMFLOW_SITE:-/tmp/ldmflow-site}
export PYTHON=$py LDMFLOW_WHEELS=$wheels LDMFLOW_SITE=$site PYTHONUNBUFFERED=1

{ nvidia-smi || echo "no nvidia-smi"; "$py" -c "import torch; print('torch', torch.__version__, 'CUDA',
    torch.version.cuda, 'GPUs', torch.cuda.device_count())"; } >"$outdir/machine.txt" 2>&1
cat "$outdir/machine.txt"

bash benchmarks/gpu_suite.sh "$outdir/suite.jsonl" "$@" 2>&1 | tee "$outdir/suite.log"
suite=${PIPESTATUS[0]}

# the suite's installs, and pytest (and what the tests import) where the machine lacks them
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
site_dirs() { find "$site" -maxdepth 5 -type d \( -name site-packages -o -name dist-packages \) 2>/dev/null | paste -sd:; }
for spec in pytest:pytest matplotlib:matplotlib tqdm:tqdm rich:rich safetensors:safetensors; do
    PYTHONPATH="$PYTHONPATH:$(site_dirs)" "$py" -c "import ${spec##*:}" 2>/dev/null && continue
    "$py" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$wheels" --prefix "$site" \
        "${spec%%:*}" || echo "gpu_check.sh: could not install ${spec%%:*} from $wheels" >&2
done
export PYTHONPATH="$PYTHONPATH:$(site_dirs)"

# only the files that hold gpu-marked tests: the others may import what a bare GPU machine lacks (Snakemake)
mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
((gpus >= 2)) || echo "gpu_check.sh: $gpus GPU(s) visible: the 2-GPU DDP smoke test is skipped"
"$py" -m pytest -p no:cacheprovider -q -rs -m gpu "${files[@]}" 2>&1 | tee "$outdir/gpu_tests.log"
tests=${PIPESTATUS[0]}
echo "gpu_check.sh: suite exit $suite, gpu tests exit $tests; records and logs in $outdir"
((suite == 0 && tests == 0))
