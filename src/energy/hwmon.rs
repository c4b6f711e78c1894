//! Energy from Linux hwmon (`/sys/class/hwmon/hwmon*`): the only portable way to read AMD GPUs
//! (amdgpu reports power in `power1_average`, µW) and Intel discrete GPUs (i915/xe report
//! `energy1_input`, µJ), plus AMD CPU energy drivers on kernels whose RAPL is not exposed.
//!
//! Only drivers known to measure a CPU or a GPU are used. Other hwmon devices (NVMe drives, ACPI
//! `power_meter` for the whole system, ...) would either be noise or double count what RAPL and
//! the GPU already report, so they are listed as skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::counter::{CounterKind, WrappingCounter};
use super::sampled::SampledPowerSensor;
use super::{
    describe_read_error, read_trimmed, read_u64, Discovery, EnergyDomain, EnergyError, EnergySensor,
};

const GPU_DRIVERS: &[&str] = &["amdgpu", "radeon", "nouveau", "i915", "xe"];
const CPU_DRIVERS: &[&str] = &["amd_energy", "zenergy"];

/// A cumulative hwmon energy counter (`energy*_input`, µJ).
#[derive(Debug)]
pub struct HwmonEnergySensor {
    name: String,
    domain: EnergyDomain,
    path: PathBuf,
    counter: WrappingCounter,
}

impl HwmonEnergySensor {
    /// Opens `energyN_input` and reads it once, so a broken file is rejected at discovery time.
    pub fn open(
        path: impl Into<PathBuf>,
        name: impl Into<String>,
        domain: EnergyDomain,
    ) -> Result<Self, EnergyError> {
        let mut s = HwmonEnergySensor {
            name: name.into(),
            domain,
            path: path.into(),
            // 64-bit µJ: wraps after ~584 000 years; going backwards means a driver reload.
            counter: WrappingCounter::new(CounterKind::Resetting),
        };
        s.read_energy_j()?;
        Ok(s)
    }
}

impl EnergySensor for HwmonEnergySensor {
    fn name(&self) -> &str {
        &self.name
    }

    fn domain(&self) -> EnergyDomain {
        self.domain
    }

    fn read_energy_j(&mut self) -> Result<f64, EnergyError> {
        let raw = read_u64(&self.path)?;
        Ok(self.counter.update(raw) as f64 / 1e6)
    }
}

/// `(channel index, file name)` of the files `prefix<N><suffix>` in `dir`, ordered by index.
fn channels(files: &[String], prefix: &str, suffix: &str) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = files
        .iter()
        .filter_map(|f| {
            let n = f.strip_prefix(prefix)?.strip_suffix(suffix)?;
            Some((n.parse().ok()?, f.clone()))
        })
        .collect();
    out.sort();
    out
}

/// Adds usable hwmon CPU/GPU sensors of `<root>/sys/class/hwmon` to `d`. `have_cpu` says RAPL
/// already covers the CPU, in which case hwmon CPU counters are skipped (same silicon counter).
pub fn discover_hwmon(root: &Path, have_cpu: bool, interval: Duration, d: &mut Discovery) {
    let dir = root.join("sys/class/hwmon");
    let Ok(listing) = std::fs::read_dir(&dir) else {
        // hwmon is a bonus source (GPUs, AMD CPUs): its absence is not worth a reason line of
        // its own; RAPL/NVML reasons already explain a missing measurement.
        return;
    };
    let mut devs: Vec<String> = listing
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("hwmon"))
        .collect();
    // Natural order: hwmon2 before hwmon10.
    devs.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));

    for dev in devs {
        let ddir = dir.join(&dev);
        let Ok(files) = std::fs::read_dir(&ddir) else {
            continue;
        };
        let files: Vec<String> = files
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        let energy = channels(&files, "energy", "_input");
        let power_avg = channels(&files, "power", "_average");
        let power_in = channels(&files, "power", "_input");
        if energy.is_empty() && power_avg.is_empty() && power_in.is_empty() {
            continue; // temperatures, fans, ...
        }
        let driver = read_trimmed(&ddir.join("name")).unwrap_or_else(|| "?".to_string());
        let domain = if GPU_DRIVERS.contains(&driver.as_str()) {
            EnergyDomain::Gpu
        } else if CPU_DRIVERS.contains(&driver.as_str()) {
            EnergyDomain::CpuPackage
        } else {
            d.skipped.push(format!(
                "hwmon {dev} ({driver}): skipped, not a known CPU/GPU energy driver"
            ));
            continue;
        };
        if domain == EnergyDomain::CpuPackage && have_cpu {
            d.skipped.push(format!(
                "hwmon {dev} ({driver}): skipped, RAPL already measures the CPU"
            ));
            continue;
        }

        if !energy.is_empty() {
            add_energy_channels(d, &ddir, &dev, &driver, domain, &energy);
            continue;
        }
        // No energy counter: integrate power. `_average` is the driver's own smoothing over
        // its update period, closer to energy than the instantaneous `_input`.
        let Some((idx, file)) = power_avg.first().or(power_in.first()).cloned() else {
            continue;
        };
        let name = format!("{driver} power{idx} ({dev})");
        match SampledPowerSensor::from_microwatt_file(&name, domain, ddir.join(&file), interval) {
            Ok(s) => d.sensors.push(Box::new(s)),
            Err(e) => d.unavailable.push(describe_read_error(
                &format!("hwmon {dev} ({driver})"),
                &e,
                "",
            )),
        }
    }
}

fn add_energy_channels(
    d: &mut Discovery,
    ddir: &Path,
    dev: &str,
    driver: &str,
    domain: EnergyDomain,
    energy: &[(u32, String)],
) {
    let mut used_gpu_channel = false;
    for (idx, file) in energy {
        let label = read_trimmed(&ddir.join(format!("energy{idx}_label")));
        let shown = label.clone().unwrap_or_else(|| format!("energy{idx}"));
        // CPU drivers list per-core counters next to the per-socket ones (amd_energy:
        // `Ecore000`.. and `Esocket0`): cores are inside the socket.
        if domain == EnergyDomain::CpuPackage
            && label
                .as_deref()
                .is_some_and(|l| l.to_ascii_lowercase().contains("core"))
        {
            d.skipped.push(format!(
                "hwmon {dev} ({driver}) {shown}: skipped, per-core counter inside the socket"
            ));
            continue;
        }
        // GPU drivers with several counters nest them (xe: `card` contains `pkg`); the first
        // channel is the whole card.
        if domain == EnergyDomain::Gpu && used_gpu_channel {
            d.skipped.push(format!(
                "hwmon {dev} ({driver}) {shown}: skipped, part of the first channel"
            ));
            continue;
        }
        let name = if energy.len() == 1 {
            format!("{driver} ({dev})")
        } else {
            format!("{driver} {shown} ({dev})")
        };
        match HwmonEnergySensor::open(ddir.join(file), name, domain) {
            Ok(s) => {
                d.sensors.push(Box::new(s));
                used_gpu_channel = domain == EnergyDomain::Gpu;
            }
            Err(e) => d.unavailable.push(describe_read_error(
                &format!("hwmon {dev} ({driver}) {shown}"),
                &e,
                "",
            )),
        }
    }
}
