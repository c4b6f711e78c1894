//! Process memory for the report's peak-memory column. A memory-mapped model counts in RSS only
//! for the pages actually touched, so RSS (not the file size) is what tells whether a model fits.

/// Peak resident set size of this process (`VmHWM`), in bytes. `None` off Linux or when
/// `/proc` is unavailable: the report then shows `n/a` rather than a guess.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM")
}

/// Current resident set size of this process (`VmRSS`), in bytes.
pub fn current_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS")
}

/// Resets the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0, `clear_refs` value 5),
/// so each benchmark test can report its own peak instead of the process-wide maximum.
/// Returns whether it worked.
pub fn reset_peak_rss() -> bool {
    cfg!(target_os = "linux") && std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn proc_status_bytes(key: &str) -> Option<u64> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_proc_status_kb(&status, key).and_then(|kb| kb.checked_mul(1024))
}

/// The value of a `Key:   1234 kB` line of `/proc/<pid>/status`, in kB (the kernel's "kB" is
/// KiB). `None` when the key is missing or malformed.
pub fn parse_proc_status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let value = parts.next()?.parse::<u64>().ok()?;
        match parts.next() {
            Some("kB") | None => Some(value),
            Some(_) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let s = "Name:\tbitnet\nVmPeak:\t  999 kB\nVmHWM:\t   2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_proc_status_kb(s, "VmHWM"), Some(2048));
        assert_eq!(parse_proc_status_kb(s, "VmRSS"), Some(1024));
        assert_eq!(parse_proc_status_kb(s, "VmSwap"), None);
        assert_eq!(parse_proc_status_kb("VmHWM: lots kB", "VmHWM"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn own_rss_is_plausible() {
        // Separate reads race with other test threads, so only check both are there.
        assert!(peak_rss_bytes().unwrap() > 0);
        assert!(current_rss_bytes().unwrap() > 0);
    }
}
