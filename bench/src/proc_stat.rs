//! CPU time of processes from Linux's `/proc` (absent elsewhere), for the benchmarks that report
//! where the CPU went.

/// Clock ticks per second of `/proc` times (`USER_HZ`, 100 on Linux).
pub const USER_HZ: f64 = 100.0;

/// `(comm, utime + stime)` of a `/proc/<pid>/stat` line, in clock ticks.
pub fn process_jiffies(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // After the comm: state (field 3) … utime (14), stime (15).
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// User plus system CPU time of this process so far (all its threads), in clock ticks.
pub fn own_jiffies() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    process_jiffies(&stat).map(|(_, jiffies)| jiffies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_lines_parse() {
        let line = "4242 (postgres: wal writer) S 1 4242 4242 0 -1 4194624 100 0 0 0 37 12 0 0 20 0 1 0 99 0 0";
        assert_eq!(process_jiffies(line), Some(("postgres: wal writer", 49)));
        assert_eq!(process_jiffies("garbage"), None);
        assert!(
            own_jiffies().is_some(),
            "this process's own times are readable"
        );
    }
}
