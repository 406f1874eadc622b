#!/usr/bin/env bash
# Wheels for a CUDA machine that reaches no package index: the H200 image (Python 3.12, manylinux x86_64,
# torch 2.11.0+cu130 and Triton 3.6 already installed).
#   1. resolves requirements.txt for that platform (pip's dry run, as a fresh install there would) and lists
#      every distribution it needs;
#   2. downloads into .whl/ (git-ignored through .git/info/exclude) exactly the resolved wheels the image lacks,
#      with their sha256 in .whl/SHA256SUMS, and prints the total size;
#   3. with --pack, also writes .whl/xz/wheels.tar.xz, for a copy to the machine under a size limit that the
#      wheels exceed (their sum is about 84 MB, tilelang's 50 and z3-solver's 29 of it): the same wheels,
#      each re-zipped without compression (the same files, so each wheel's RECORD still holds), then one xz
#      stream over all of them, which compresses across files as the wheels' per-file deflate cannot.
# There (from the checkout's root):
#   wheels=.whl                                                     # or, with the pack:
#   wheels=/tmp/wheels; bash tools/gpu_wheels.sh --unpack .whl/xz/wheels.tar.xz $wheels   # checks every RECORD
#   python3 -m pip install --no-index --find-links $wheels -r requirements.txt
# Usage, here:  bash tools/gpu_wheels.sh [--pack]     (IMAGE_TORCH=2.11.0 is the image's torch)
set -euo pipefail
PY=${PYTHON:-python3}

if [ "${1:-}" = --unpack ]; then  # --unpack ARCHIVE DIR: extract, then check each file against its wheel's RECORD
    mkdir -p "$3" && tar xJf "$2" -C "$3"
    exec "$PY" - "$3" <<'EOF'
import base64, csv, glob, hashlib, io, os, sys, zipfile
bad = 0
wheels = sorted(glob.glob(os.path.join(sys.argv[1], '*.whl')))
for w in wheels:
    z = zipfile.ZipFile(w)
    record = next(n for n in z.namelist() if n.endswith('.dist-info/RECORD'))
    for row in csv.reader(io.TextIOWrapper(z.open(record), 'utf-8')):
        if not row or not row[1]:
            continue  # RECORD itself (and signatures) carry no hash
        algo, want = row[1].split('=', 1)
        got = base64.urlsafe_b64encode(hashlib.new(algo, z.read(row[0])).digest()).rstrip(b'=').decode()
        if got != want:
            print(f"{os.path.basename(w)}: {row[0]} does not match its RECORD", file=sys.stderr)
            bad += 1
print(f"{len(wheels)} wheels in {sys.argv[1]}: "
      + ("every file matches its RECORD" if not bad else f"{bad} mismatches"))
sys.exit(1 if bad else 0)
EOF
fi

root=$(git rev-parse --show-toplevel)
cd "$root"
# pip evaluates requirements.txt's environment markers (platform_system, platform_machine) for the machine it
# runs on, not for --platform: only a Linux x86_64 machine resolves what the H200 would
[ "$(uname -sm)" = "Linux x86_64" ] || { echo "run this on Linux x86_64 (the markers are evaluated here)"; exit 1; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"

# The H200 image's platform: CPython 3.12, glibc 2.39, so every manylinux tag up to 2_39.
plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for n in $(seq 39 -1 5); do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

# Already on the H200 image (its package list, as read on 2026-11-17), so not carried. Anything resolved and not
# named here is downloaded; a name here that the image turns out to lack fails the --no-index install, loudly.
on_image=(
    torch triton                                   # 2.11.0+cu130 and 3.6.0, the image's CUDA build
    'nvidia-*' 'cuda-*'                            # torch's CUDA libraries (cuda-bindings, -pathfinder, -toolkit)
    filelock fsspec jinja2 markupsafe mpmath networkx setuptools sympy typing-extensions  # torch's own deps
    numpy
    matplotlib contourpy cycler fonttools kiwisolver packaging pillow pyparsing python-dateutil six
    tzdata                                         # python-dateutil 4's; the image's matplotlib stack is its own
    tqdm einops
    tiktoken regex requests certifi charset-normalizer idna urllib3
    cloudpickle ml-dtypes psutil                   # tilelang's small deps, on the image as well
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "torch==${IMAGE_TORCH:-2.11.0}" > "$tmp/constraints.txt"  # resolve against the image's torch
echo "resolving requirements.txt for CPython 3.12 manylinux x86_64 with torch==${IMAGE_TORCH:-2.11.0} ..."
"$PY" -m pip install -q --dry-run --ignore-installed --report "$tmp/report.json" "${plat[@]}" \
    --target "$tmp/target" -c "$tmp/constraints.txt" -r requirements.txt
"$PY" - "$tmp/report.json" "${on_image[@]}" > "$tmp/carry.txt" <<'EOF'
import fnmatch, json, re, sys
report, on_image = json.load(open(sys.argv[1])), sys.argv[2:]
norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
print('every distribution requirements.txt resolves to there:', file=sys.stderr)
for d in sorted(report['install'], key=lambda d: norm(d['metadata']['name'])):
    name, version = norm(d['metadata']['name']), d['metadata']['version']
    skip = any(fnmatch.fnmatch(name, p) for p in on_image)
    wheel = d['download_info']['url'].rsplit('/', 1)[-1]
    print(f"  {'on the image' if skip else 'carry':12s}  {name}=={version}  {wheel}", file=sys.stderr)
    if not skip:
        print(f"{name}=={version}")
EOF
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps "${plat[@]}" -d .whl -r "$tmp/carry.txt"
(cd .whl && sha256sum ./*.whl > SHA256SUMS)
echo "in .whl/ (what the image lacks):"
ls -l .whl/*.whl | awk '{printf "  %6.1f MB  %s\n", $5 / 1e6, $NF}'
total=$(cat .whl/*.whl | wc -c)
echo "total $(awk -v b="$total" 'BEGIN {printf "%.1f MB", b / 1e6}')"
if [ "$total" -gt 55000000 ]; then
    echo "over 55 MB: too large to copy with the working tree under a 64 MiB limit; use --pack"
fi

if [ "${1:-}" = --pack ]; then
    mkdir -p "$tmp/stored" .whl/xz
    "$PY" - "$tmp/stored" .whl/*.whl <<'EOF'
import os, sys, zipfile
for w in sys.argv[2:]:  # same members, same bytes, same order; stored instead of deflated
    with zipfile.ZipFile(w) as zi, zipfile.ZipFile(os.path.join(sys.argv[1], os.path.basename(w)), 'w') as zo:
        for info in zi.infolist():
            data = zi.read(info)
            info.compress_type = zipfile.ZIP_STORED
            zo.writestr(info, data)
EOF
    echo "packing (xz over the uncompressed wheels: about 3 minutes) ..."
    # one xz block at -9 (64 MiB dictionary): 40.6 MB, against 53.1 MB at -6 -T2, whose 24 MiB blocks and 8 MiB
    # dictionary see less of what the wheels share; with the checkout that made the difference under the limit
    tar cf - -C "$tmp/stored" . | xz -T1 -9 > .whl/xz/wheels.tar.xz
    size=$(wc -c < .whl/xz/wheels.tar.xz)
    echo "pack: .whl/xz/wheels.tar.xz $(awk -v b="$size" 'BEGIN {printf "%.1f MB", b / 1e6}')"
    echo "  carry '.whl/xz' (not '.whl'); there: bash tools/gpu_wheels.sh --unpack .whl/xz/wheels.tar.xz /tmp/wheels"
fi
