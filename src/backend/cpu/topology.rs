//! How many threads the CPU backend starts by default.

/// One thread per physical core this process may use: SMT siblings share the SIMD units the
/// ternary kernels saturate, so a second thread per core adds scheduling cost and no speed.
/// Linux reads the core topology from sysfs; elsewhere (or if sysfs is unreadable) every
/// logical CPU counts.
pub fn default_threads() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores().map_or(logical, |p| p.clamp(1, logical))
}

fn physical_cores() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let mut cores = std::collections::HashSet::new();
        for entry in std::fs::read_dir("/sys/devices/system/cpu").ok()? {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            if name
                .strip_prefix("cpu")
                .is_none_or(|n| n.parse::<u32>().is_err())
            {
                continue;
            }
            // Offline CPUs have no topology folder; they are skipped.
            if let Ok(siblings) =
                std::fs::read_to_string(path.join("topology/thread_siblings_list"))
            {
                cores.insert(siblings.trim().to_string());
            }
        }
        (!cores.is_empty()).then_some(cores.len())
    }
    #[cfg(not(target_os = "linux"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_threads_is_within_the_logical_cpus() {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        let t = default_threads();
        assert!(
            (1..=logical).contains(&t),
            "{t} threads of {logical} logical CPUs"
        );
    }
}
