//! Gatehouse benchmarks: the scripts in `bench/` and the binaries in `src/bin/` (see
//! `bench/README.md`).

pub mod postgres;
pub mod proc_stat;
pub mod records;
pub mod report;
