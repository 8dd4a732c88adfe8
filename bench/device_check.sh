#!/usr/bin/env bash
# The whole GPU visit of issue 14, as one command for the device tool (run from the repository root):
#
#   run(command="bash bench/device_check.sh", carry=["wheels"], timeout_s=540)
#
# 1. installs the carried wheels (`make device-wheels`) with pip --no-index into a target folder and puts
#    it on PYTHONPATH, with the repository itself (the tree travels; storyreel is not shipped as a wheel);
# 2. puts the ffmpeg that travels xz-compressed back into imageio_ffmpeg;
# 3. writes a `storyreel` console script like pip's ([project.scripts] storyreel = "daemon.cli:main");
# 4. runs bench/device_check.py with what is left of the visit's budget: one table on stdout, and
#    device_check.{md,json,log} under $OUT.
# Without CUDA the driver runs its reduced version; with no wheels folder it uses $PYTHON's own packages.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PYTHON=${PYTHON:-python3}
WHEELS=${DEVICE_CHECK_WHEELS:-wheels}
SITE=${DEVICE_CHECK_SITE:-/tmp/storyreel-site}
VISIT_S=${DEVICE_CHECK_SECONDS:-470}  # the issue's 8 minutes, less a margin to print and hand back
export OUT=${OUT:-$PWD/bench/out/device_check}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$SITE/bin"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  rm -rf "$SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || { echo "device_check: pip install from $WHEELS failed"; exit 2; }
  "$PYTHON" bench/device_wheels.py unpack-ffmpeg "$WHEELS" "$SITE" || { echo "device_check: no ffmpeg"; exit 2; }
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "device_check: installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - start )) s"
else
  echo "device_check: no wheels in $WHEELS; using $PYTHON's own packages"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$SITE/bin"
printf '#!%s\nimport sys\nfrom daemon.cli import main\nsys.exit(main())\n' "$(command -v "$PYTHON")" >"$SITE/bin/storyreel"
chmod +x "$SITE/bin/storyreel"
export PATH="$SITE/bin:$PATH"

# Fail fast on a missing wheel (found, not imported: the parts import for real and report any error).
"$PYTHON" - <<'EOF' || { echo "device_check: a package is missing (see above)"; exit 2; }
import importlib.util, sys
names = ("diffusers", "compel", "pydantic", "pydantic_settings", "structlog", "watchdog", "moviepy",
         "imageio_ffmpeg", "psutil", "transformers", "accelerate", "cv2", "tqdm", "pipeline", "daemon")
missing = [n for n in names if importlib.util.find_spec(n) is None]
if missing:
    sys.exit("missing: " + ", ".join(missing))
print("device_check: packages found; python", sys.version.split()[0])
EOF

left=$(( VISIT_S - ($(date +%s) - start) ))
exec "$PYTHON" -u bench/device_check.py --out "$OUT" --budget "$left" "$@"
