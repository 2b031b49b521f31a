#!/usr/bin/env bash
# Installs what building the portal needs, if missing: the wasm32 target, cargo-leptos 0.3.10
# (built with --features no_downloads, so the build never fetches a binary) and wasm-bindgen-cli at
# exactly the wasm-bindgen version in Cargo.lock. Idempotent; fails loudly.
#
#   scripts/portal-tools.sh && cargo leptos build   # a development build; for a release build
#                                                    # (it needs wasm-opt too): scripts/build-portal-release.sh
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'scripts/portal-tools.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '== %s\n' "$*"; }

command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup first"
command -v rustup >/dev/null || die "rustup is missing: the wasm32 target is added with rustup"

leptos_version=0.3.10
bindgen_version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
[ -n "$bindgen_version" ] || die "no wasm-bindgen in Cargo.lock"

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown || die "could not add the wasm32 target"
fi

if [ "$(cargo leptos --version 2>/dev/null | awk '{print $2}')" != "$leptos_version" ]; then
  say "installing cargo-leptos $leptos_version (no_downloads)"
  # --locked: the newest versions of its dependencies need a newer rustc than this toolchain.
  cargo install cargo-leptos --version "$leptos_version" --features no_downloads --locked \
    || die "could not install cargo-leptos $leptos_version"
fi

if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$bindgen_version" ]; then
  say "installing wasm-bindgen-cli $bindgen_version (the version in Cargo.lock)"
  cargo install wasm-bindgen-cli --version "$bindgen_version" --force \
    || die "could not install wasm-bindgen-cli $bindgen_version"
fi

say "portal tools ready: $(cargo leptos --version), wasm-bindgen $bindgen_version"
