//! Gatehouse benchmarks: the scripts in `bench/` and the binaries in `src/bin/` (see
//! `bench/README.md`).
