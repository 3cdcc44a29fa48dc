#!/usr/bin/env bash
# The GPU suite (benchmarks/device_suite.py) on a machine without network, in at most 8 minutes start to end.
#
#   bash benchmarks/device_suite.sh --out PATH [--smoke] [--total-s SECONDS] [--dry-run]
#
# 1. Installs what the machine's Python lacks from the wheels in .wheels/ (`make device-wheels` fills it where pip
#    reaches PyPI): each wheel whose distribution is not installed goes into /tmp/superlm_device_site, which is put
#    first on PYTHONPATH. No index, no dependencies resolved, nothing of the image's own jax/flax replaced.
# 2. Puts the checkout itself on PYTHONPATH (no `pip install -e`: that would write an egg-info into the checkout).
# 3. Runs the suite under `timeout`, so a hung compiler cannot hold the machine past the total: the suite gets the
#    total less the time spent so far and a margin, and shares it out among its parts; it writes the JSON after
#    every part, so a kill still leaves the parts already done.
# --dry-run prints what would run and runs nothing. Writes nothing outside --out and /tmp.
set -uo pipefail

usage() {
  echo "usage: bash benchmarks/device_suite.sh --out PATH [--smoke] [--total-s SECONDS] [--dry-run]" >&2
  exit 2
}

out=""
smoke=""
dry_run=""
total_s=470  # 8 minutes less 10 s for the run tool's own start and the kill's grace period
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --smoke) smoke="--smoke"; shift ;;
    --total-s) [ $# -ge 2 ] || usage; total_s=$2; shift 2 ;;
    --total-s=*) total_s=${1#--total-s=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    *) echo "device_suite.sh: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$out" ] || { echo "device_suite.sh: --out is required" >&2; usage; }
case "$total_s" in ''|*[!0-9]*) echo "device_suite.sh: --total-s must be a whole number of seconds" >&2; usage ;; esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "$out")  # relative to where the caller stands, before the cd below
python=${PYTHON:-python3}
site=/tmp/superlm_device_site
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
cd "$repo"

# ---- 1. the missing packages, from carried wheels
missing=$("$python" - "$repo/.wheels" <<'EOF'
import importlib.metadata, pathlib, sys
# A wheel's file name starts with its distribution name; install it only where no version is installed already.
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
  try:
    importlib.metadata.version(wheel.name.split("-")[0])
  except importlib.metadata.PackageNotFoundError:
    print(wheel)
EOF
)
if [ ! -d .wheels ]; then
  echo "device_suite.sh: no .wheels/ here (run \`make device-wheels\` where pip reaches PyPI, carry .wheels);" \
       "packages the machine lacks will be missing" >&2
elif [ -n "$missing" ]; then
  echo "installing into $site:" $(basename -a $missing)
  if [ -z "$dry_run" ]; then
    # shellcheck disable=SC2086 (one path per word)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $missing \
      || echo "device_suite.sh: pip install failed; the suite records what cannot be imported" >&2
  fi
else
  echo "every wheel in .wheels/ is installed already"
fi
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$dry_run" ]; then
  "$python" - <<'EOF'
import importlib, sys
for module in ("ml_collections", "grain", "tensorboardX", "tokamax"):  # tokamax is optional: one part's rows
  try:
    importlib.import_module(module)
  except Exception as e:  # noqa: BLE001
    print(f"device_suite.sh: cannot import {module}: {e!r}", file=sys.stderr)
EOF
fi

# ---- 2. the suite, under the remaining time
left=$((total_s - SECONDS))
budget=$((left - 20))  # the suite's own start-up and its last write of the JSON
if [ "$budget" -lt 60 ]; then
  echo "device_suite.sh: only ${left} s left of ${total_s} s after the install" >&2
  exit 1
fi
command=(timeout --kill-after=5 "$left" "$python" benchmarks/device_suite.py --out "$out" --budget_s "$budget" $smoke)
echo "+ ${command[*]}"
[ -n "$dry_run" ] && exit 0
"${command[@]}"
status=$?
if [ "$status" -eq 124 ]; then
  echo "device_suite.sh: the suite ran past ${left} s and was stopped; $out holds the parts done" >&2
fi
exit "$status"
