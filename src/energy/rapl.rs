//! CPU package and DRAM energy from Linux RAPL through the powercap sysfs interface
//! (`/sys/class/powercap/intel-rapl:N[:M]`; AMD Zen CPUs use the same driver and names, and
//! `amd-rapl` style names are accepted too).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::counter::{CounterKind, WrappingCounter};
use super::{
    describe_read_error, read_trimmed, read_u64, Discovery, EnergyDomain, EnergyError, EnergySensor,
};

/// What to tell a user who gets "permission denied": since the PLATYPUS side channel
/// (CVE-2020-8694, Linux 5.10) `energy_uj` is readable by root only.
const PERMISSION_HINT: &str = "root-only since Linux 5.10: run as root or \
     `sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj`";

/// One RAPL zone (`package-N` or `dram`), unwrapping `energy_uj` with `max_energy_range_uj`.
#[derive(Debug)]
pub struct RaplSensor {
    name: String,
    domain: EnergyDomain,
    energy_path: PathBuf,
    counter: WrappingCounter,
}

impl RaplSensor {
    /// Opens the zone directory and takes a first reading, so an unreadable counter is caught
    /// at discovery time (where it becomes a reason) rather than in the middle of a benchmark.
    pub fn open(
        zone_dir: &Path,
        name: impl Into<String>,
        domain: EnergyDomain,
    ) -> Result<Self, EnergyError> {
        let max = read_u64(&zone_dir.join("max_energy_range_uj"))?;
        let mut sensor = RaplSensor {
            name: name.into(),
            domain,
            energy_path: zone_dir.join("energy_uj"),
            counter: WrappingCounter::new(CounterKind::Wrapping { max }),
        };
        sensor.read_energy_j()?;
        Ok(sensor)
    }
}

impl EnergySensor for RaplSensor {
    fn name(&self) -> &str {
        &self.name
    }

    fn domain(&self) -> EnergyDomain {
        self.domain
    }

    fn read_energy_j(&mut self) -> Result<f64, EnergyError> {
        let raw = read_u64(&self.energy_path)?;
        Ok(self.counter.update(raw) as f64 / 1e6)
    }
}

struct Zone {
    entry: String,
    dir: PathBuf,
    zone_name: String,
    domain: EnergyDomain,
}

/// Adds the RAPL package and DRAM zones of `<root>/sys/class/powercap` to `d`. `core`, `uncore`
/// (already inside `package`) and `psys` (the whole platform, overlapping package and DRAM) are
/// listed as skipped rather than used, so the total never counts the same joule twice.
pub fn discover_rapl(root: &Path, d: &mut Discovery) {
    let dir = root.join("sys/class/powercap");
    if !dir.is_dir() {
        d.unavailable.push(format!(
            "no RAPL in this machine: {} not present (VM?)",
            dir.display()
        ));
        return;
    }
    let listing = match std::fs::read_dir(&dir) {
        Ok(l) => l,
        Err(e) => {
            d.unavailable
                .push(format!("RAPL: cannot list {}: {e}", dir.display()));
            return;
        }
    };
    let mut entries: Vec<String> = listing
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        // `intel-rapl` itself is the control type (no counter); zones have `:N`.
        .filter(|n| n.contains("rapl") && n.contains(':'))
        .collect();
    entries.sort();
    if entries.is_empty() {
        d.unavailable.push(format!(
            "no RAPL zones under {} (VM, or a CPU without RAPL)",
            dir.display()
        ));
        return;
    }

    let mut zones = Vec::new();
    for entry in entries {
        let zdir = dir.join(&entry);
        let Some(zone_name) = read_trimmed(&zdir.join("name")) else {
            d.unavailable
                .push(format!("RAPL {entry}: missing or empty `name` file"));
            continue;
        };
        let domain = if zone_name.starts_with("package") {
            EnergyDomain::CpuPackage
        } else if zone_name == "dram" {
            EnergyDomain::Dram
        } else {
            let why = match zone_name.as_str() {
                "core" | "uncore" => "already counted in its package",
                "psys" => "whole platform, overlaps package and dram",
                _ => "unknown RAPL domain",
            };
            d.skipped
                .push(format!("RAPL {entry} ({zone_name}): skipped, {why}"));
            continue;
        };
        zones.push(Zone {
            entry,
            dir: zdir,
            zone_name,
            domain,
        });
    }

    // The MMIO interface (`intel-rapl-mmio:0`) mirrors the MSR package zone on recent Intel
    // CPUs; use it only when the MSR zones are not there.
    let has_msr_package = zones
        .iter()
        .any(|z| z.domain == EnergyDomain::CpuPackage && !z.entry.contains("mmio"));
    zones.retain(|z| {
        if has_msr_package && z.entry.contains("mmio") {
            d.skipped.push(format!(
                "RAPL {} ({}): skipped, MMIO duplicate of the MSR zone",
                z.entry, z.zone_name
            ));
            false
        } else {
            true
        }
    });

    // Two sockets give two zones named `dram`: disambiguate with the sysfs entry.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for z in &zones {
        *counts.entry(z.zone_name.as_str()).or_default() += 1;
    }
    let named: Vec<(String, &Zone)> = zones
        .iter()
        .map(|z| {
            let name = if counts[z.zone_name.as_str()] > 1 {
                format!("RAPL {} ({})", z.zone_name, z.entry)
            } else {
                format!("RAPL {}", z.zone_name)
            };
            (name, z)
        })
        .collect();

    for (name, z) in named {
        match RaplSensor::open(&z.dir, name, z.domain) {
            Ok(s) => d.sensors.push(Box::new(s)),
            Err(e) => d.unavailable.push(describe_read_error(
                &format!("RAPL {} ({})", z.entry, z.zone_name),
                &e,
                PERMISSION_HINT,
            )),
        }
    }
}
