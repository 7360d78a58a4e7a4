#!/usr/bin/env bash
# Refreshes requirements/constraints.txt, the exact versions scripts/setup.sh installs (CONTRIBUTING.md: "The lock").
# Resolves setup.py with every extra plus requirements/torch.in to the newest releases allowed, with pip-tools.
# Then: bash scripts/setup.sh && .ci/run, and commit the new lock only when CI is green.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -m piptools compile --quiet --upgrade --all-extras --strip-extras --allow-unsafe \
  --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
  --output-file requirements/constraints.txt setup.py requirements/torch.in
# the CPU wheel resolves as 2.13.0+cpu; pin the public version, which a GPU build of the same release satisfies too
sed -i -E 's/^(torch==[0-9][0-9.]*)\+[a-z0-9.]+$/\1/' requirements/constraints.txt
# pip is the installer, not part of the environment: pinning it would make setup.sh replace the pip that runs it
awk '/^pip==/ {skip = 1; next} skip && /^    #/ {next} {skip = 0; print}' requirements/constraints.txt > "$$.tmp"
mv "$$.tmp" requirements/constraints.txt
echo "wrote requirements/constraints.txt: $(grep -c '==' requirements/constraints.txt) pinned packages"
