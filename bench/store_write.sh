#!/usr/bin/env bash
# Audit store write throughput: builds `store_write` (release) and runs it. It writes realistic
# chat-completion audit records (2 KB prompt, 2 KB completion) in batches of 512 to a fresh SQLite
# file and to a fresh PostgreSQL database, and prints records/s per engine against the issue's
# target of 5,000 records/s. See bench/README.md.
#
#   bench/store_write.sh                          # 50,000 records per engine, both engines
#   bench/store_write.sh --records 20000 --engines sqlite
#   bench/store_write.sh --help                   # every option
#
# Environment (optional):
#   GATEHOUSE_BENCH_POSTGRES_URL   server URL (default postgres://postgres@127.0.0.1:5432/postgres);
#                                  the benchmark creates gh_bench_<uuid> there and drops it
#   GATEHOUSE_STORE_WRITE_BIN      run this binary instead of building one
#
# Output: a table on stdout and one JSON line in bench/out/store_write-<timestamp>.json. Exit
# status 0 when the benchmark ran (met the target or not; pass --check for 2 on a miss), non-zero
# otherwise (1 when the run broke, cargo's status when the build did).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bin=${GATEHOUSE_STORE_WRITE_BIN:-}
if [[ -z "$bin" ]]; then
  cargo build --release --locked -p gatehouse-bench --bin store_write >&2
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  bin="$target_dir/release/store_write"
fi
exec "$bin" "$@"
