#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing, then runs every test and
# the end-to-end browser checks (end2end/run.sh).
#
#   scripts/test.sh            # everything
#   scripts/test.sh -E 'test(failover)'   # extra arguments go to cargo nextest
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\n== %s\n' "$*"; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }

say "toolchain"
command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup first"
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest || die "could not install cargo-nextest"
fi

say "python environment for the OpenAI SDK compatibility tests"
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "python3 is missing"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" || die "could not create $venv (is python3-venv installed?)"
fi
if ! "$venv/bin/python" -c 'import openai, pytest' >/dev/null 2>&1; then
  "$venv/bin/pip" install --quiet -r tests/sdk/requirements.txt || die "could not install tests/sdk/requirements.txt"
fi
export GATEHOUSE_TEST_PYTHON="$venv/bin/python"

say "PostgreSQL for the audit-store tests"
pg_url=${GATEHOUSE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
if command -v pg_isready >/dev/null && ! pg_isready -q -d "$pg_url"; then
  # This machine's server is normally running; start it if it is installed but stopped.
  if command -v pg_ctlcluster >/dev/null; then
    for version in $(ls /etc/postgresql 2>/dev/null); do
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
  fi
  pg_isready -q -d "$pg_url" || die "PostgreSQL is not answering at $pg_url (set GATEHOUSE_TEST_POSTGRES_URL)"
fi

say "the sqlite3 shell (a test reads the audit store with it, as an auditor would)"
if ! command -v sqlite3 >/dev/null; then
  [ "$(id -u)" = 0 ] || die "the sqlite3 shell is missing and this is not root: apt-get install -y sqlite3"
  apt-get install -y sqlite3 || { apt-get update && apt-get install -y sqlite3; } \
    || die "could not install sqlite3"
fi

say "build"
# The binaries the tests start and the tests themselves, in one build: one set of features for
# every dependency (the tests' dev-dependencies included), so that nextest and end2end/run.sh
# find everything built instead of compiling it again with other features.
cargo build --workspace --bins --tests --locked
export GATEHOUSE_BIN_DIR="${CARGO_TARGET_DIR:-$root/target}/debug"

say "tests"
cargo nextest run --workspace --locked --no-fail-fast "$@"

say "end-to-end: the portal in Debian's Chromium against a real OpenID Connect provider"
if [ ! -x /usr/bin/chromium ]; then
  [ "$(id -u)" = 0 ] || die "Debian's chromium is missing and this is not root: apt-get install -y chromium"
  apt-get install -y chromium || { apt-get update && apt-get install -y chromium; } \
    || die "could not install chromium"
fi
command -v npm >/dev/null || die "npm is missing (Debian: apt-get install -y nodejs npm)"
# end2end/run.sh adds the wasm32 target and cargo-leptos (scripts/portal-tools.sh) and runs npm ci.
end2end/run.sh
