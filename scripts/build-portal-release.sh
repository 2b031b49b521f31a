#!/usr/bin/env bash
# Builds the portal for release (cargo leptos build --release), as scripts/run.sh runs it: the
# server binary in the target directory's release/ and the optimised front end in target/site.
# Extra arguments go to cargo leptos (end2end/run.sh passes --frontend-only).
#
# A release build runs Binaryen's wasm-opt over the front end's WebAssembly, and cargo-leptos built
# with no_downloads takes it from the PATH. Debian's wasm-opt (108) is too old for what rustc emits
# now (the app it optimises fails in the browser as it starts), so the npm build pinned in
# scripts/binaryen/package-lock.json is installed and put first on the PATH. The features wasm-opt
# may assume are `wasm-opt-features` in the workspace Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
die() { printf 'scripts/build-portal-release.sh: %s\n' "$*" >&2; exit 1; }

scripts/portal-tools.sh
command -v npm >/dev/null || die "npm is missing (Debian: apt-get install -y nodejs npm)"
(cd scripts/binaryen && npm ci --no-audit --no-fund) || die "npm ci in scripts/binaryen failed"
PATH="$root/scripts/binaryen/node_modules/.bin:$PATH" cargo leptos build --release "$@" \
  || die "cargo leptos build --release failed"
