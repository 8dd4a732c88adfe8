#!/usr/bin/env bash
# The whole GPU visit, as one command for the device tool (run from the repository root):
#
#   run(command="bash bench/device_check.sh", carry=["wheels"], timeout_s=560, kind="nvidia-h100-x1")
#
# 1. installs the carried wheels (`make device-wheels`: what the device lacks, storyreel's own wheel
#    among them, so pip writes its metadata and its `storyreel` console script) with pip --no-index
#    into a target folder; the fallbacks (wheels/fallback) only where the device's copy is missing or
#    too old; then the tree and that folder go on PYTHONPATH (the tree first: its code is what runs);
# 2. puts the ffmpeg that travels xz-compressed back into imageio_ffmpeg;
# 3. runs bench/device_check.py with what is left of the visit's budget: one table on stdout, and
#    device_check.{md,json,log} and device_setup.log under $OUT.
# No step stops the visit: a wheel that does not install is retried alone and named, a missing ffmpeg
# is noted, and the parts report what then fails. Whatever happens, $OUT/device_check.md says it.
# Without CUDA the driver runs its reduced version; with no wheels folder it uses $PYTHON's own packages.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PYTHON=${PYTHON:-python3}
WHEELS=${DEVICE_CHECK_WHEELS:-wheels}
SITE=${DEVICE_CHECK_SITE:-/tmp/storyreel-site}
VISIT_S=${DEVICE_CHECK_SECONDS:-490}  # the call's 560 s, less the start of python and a margin
export OUT=${OUT:-$PWD/bench/out/device_check}
export PYTHONUNBUFFERED=1 DEVICE_CHECK_SITE="$SITE"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1  # no network there: never wait on one
# Fixed cache folders: a rerun on the still-warm machine finds what the first call compiled.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/storyreel-inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/storyreel-triton}
mkdir -p "$OUT"
SETUP="$OUT/device_setup.log"
: >"$SETUP"
say() { echo "device_check: $*" | tee -a "$SETUP"; }
HAND_WRITTEN="written by bench/device_check.sh: no storyreel wheel was installed"
pip_target() { "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@" >>"$SETUP" 2>&1; }
problems=()

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  rm -rf "$SITE"
  mkdir -p "$SITE"
  # Before PYTHONPATH names $SITE: the device's own copies are what is compared.
  "$PYTHON" bench/device_wheels.py fallbacks "$WHEELS/fallback" "$SITE" >>"$SETUP" 2>&1 \
    || problems+=("fallback wheels: see device_setup.log")
  if ! pip_target "$WHEELS"/*.whl; then
    say "pip install of all wheels at once failed; one at a time"
    for whl in "$WHEELS"/*.whl; do pip_target "$whl" || problems+=("$(basename "$whl") did not install"); done
  fi
  "$PYTHON" bench/device_wheels.py unpack-ffmpeg "$WHEELS" "$SITE" >>"$SETUP" 2>&1 \
    || problems+=("no ffmpeg: clips will fail")
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  say "installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - start )) s"
else
  say "no wheels in $WHEELS; using $PYTHON's own packages"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ ! -x "$SITE/bin/storyreel" ]; then
  # No storyreel wheel installed (or none carried): the console script pip would write, by hand,
  # so that the tree's storyreel runs and not some other one on PATH.
  mkdir -p "$SITE/bin"
  printf '#!%s\n# %s\nimport sys\nfrom daemon.cli import main\nsys.exit(main())\n' "$(command -v "$PYTHON")" \
    "$HAND_WRITTEN" >"$SITE/bin/storyreel"
  chmod +x "$SITE/bin/storyreel"
  say "no storyreel console script from pip: wrote one by hand"
fi
export PATH="$SITE/bin:$PATH"
for p in "${problems[@]}"; do say "PROBLEM: $p"; done

left=$(( VISIT_S - ($(date +%s) - start) ))
"$PYTHON" -u bench/device_check.py --out "$OUT" --budget "$left" --setup-log "$SETUP" "$@"
rc=$?
if [ ! -s "$OUT/device_check.md" ]; then  # the driver never got as far as its table
  { echo "storyreel device check: bench/device_check.py exited $rc before writing its table"
    echo; echo '```'; tail -n 60 "$SETUP"; echo '```'; } >"$OUT/device_check.md"
  cat "$OUT/device_check.md"
fi
exit $rc
