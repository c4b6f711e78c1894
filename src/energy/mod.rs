//! Measured energy for `bitnet bench`: each hardware counter (RAPL, hwmon, NVML) sits behind the
//! small [`EnergySensor`] trait, so the benchmark only ever sees "a cumulative number of joules"
//! and never has to know which driver produced it.
//!
//! Design rules, all in service of "never invent numbers":
//! * a sensor that is absent or unreadable is not an error: discovery turns it into a
//!   human-readable reason (the report prints `n/a (reason)`), because most machines — VMs,
//!   laptops without root, CI — have no readable energy counter at all;
//! * counters wrap (RAPL wraps every few minutes at high power), so each sensor unwraps its own
//!   counter and only ever returns a monotonic value — callers just subtract;
//! * a user-declared wall power (`--power-watts`) is supported but carried as an estimate all the
//!   way to the report, so it can never be mistaken for a measurement.

mod counter;
mod hwmon;
mod memory;
mod meter;
mod nvml;
mod rapl;
mod sampled;

use std::fmt;
use std::path::{Path, PathBuf};

pub use counter::{CounterKind, WrappingCounter};
pub use hwmon::{discover_hwmon, HwmonEnergySensor};
pub use memory::{current_rss_bytes, parse_proc_status_kb, peak_rss_bytes, reset_peak_rss};
pub use meter::{
    energy_above_idle, EnergyMeter, EnergyReading, EnergySnapshot, IdleBaseline, WallMeterEstimate,
};
pub use nvml::{
    discover_nvml, nvml_memory_info, GpuMemoryInfo, Nvml, NvmlEnergySensor, NVML_NOT_FOUND,
};
pub use rapl::{discover_rapl, RaplSensor};
pub use sampled::{integrate_trapezoid, SampledPowerSensor, DEFAULT_SAMPLE_INTERVAL};

/// Environment variable that relocates the sysfs tree. Tests and people debugging a report from
/// another machine point it at a copied `/sys` tree; it is read in one place ([`sysfs_root`]).
pub const SYSFS_ROOT_ENV: &str = "BITNET_SYSFS_ROOT";

/// The directory that contains `sys/class/...`: `$BITNET_SYSFS_ROOT`, or `/`.
pub fn sysfs_root() -> PathBuf {
    match std::env::var_os(SYSFS_ROOT_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("/"),
    }
}

/// What part of the machine a sensor measures. Reports group by it, and it is how discovery
/// avoids double counting (e.g. RAPL `core` is already inside `package`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnergyDomain {
    CpuPackage,
    Dram,
    Gpu,
    Other,
}

impl fmt::Display for EnergyDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnergyDomain::CpuPackage => "cpu-package",
            EnergyDomain::Dram => "dram",
            EnergyDomain::Gpu => "gpu",
            EnergyDomain::Other => "other",
        })
    }
}

/// Failures while *reading* a sensor that discovery had accepted (a sensor that cannot be used at
/// all never gets this far: it becomes a reason string in [`Discovery::unavailable`]).
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: expected a non-negative integer, found {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error("NVML {call} failed: {message} (code {code})")]
    Nvml {
        call: &'static str,
        code: i32,
        message: String,
    },
    #[error("NVML: {0}")]
    NvmlLoad(String),
    #[error("power sampler for {0} has stopped")]
    SamplerStopped(String),
    #[error("power sampler for {sensor}: no successful sample yet ({last_error})")]
    NoSamples { sensor: String, last_error: String },
    #[error("no energy sensor and no declared wall power")]
    NoSensors,
    #[error("energy snapshot has {snapshot} sensors but the meter has {meter}")]
    SnapshotMismatch { snapshot: usize, meter: usize },
}

/// One energy counter. The returned value is cumulative joules since an arbitrary origin; only
/// differences between two reads are meaningful. Implementations unwrap counter overflow so the
/// value never decreases (as long as they are read at least once per wrap period).
pub trait EnergySensor: Send {
    /// Short human-readable name, shown in reports ("RAPL package-0", "NVML NVIDIA H100").
    fn name(&self) -> &str;
    fn domain(&self) -> EnergyDomain;
    fn read_energy_j(&mut self) -> Result<f64, EnergyError>;
}

/// Where discovery looks. The root is explicit (rather than only the environment variable) so
/// parallel tests can each use their own fake tree without racing on process-wide env vars.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// Directory containing `sys/class/powercap` and `sys/class/hwmon`.
    pub sysfs_root: PathBuf,
    pub rapl: bool,
    pub hwmon: bool,
    pub nvml: bool,
    /// Load NVML from exactly this file instead of the platform's default names.
    pub nvml_library: Option<PathBuf>,
    /// Sampling period of the power-integrating sensors (hwmon `power*`, NVML power fallback).
    pub sample_interval: std::time::Duration,
}

impl DiscoverOptions {
    /// Everything enabled, sysfs under `root`.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        DiscoverOptions {
            sysfs_root: root.into(),
            rapl: true,
            hwmon: true,
            nvml: true,
            nvml_library: None,
            sample_interval: DEFAULT_SAMPLE_INTERVAL,
        }
    }
}

impl Default for DiscoverOptions {
    /// Everything enabled, root from [`sysfs_root`].
    fn default() -> Self {
        Self::with_root(sysfs_root())
    }
}

/// The outcome of looking for sensors: the usable ones, plus why others are not used. Both lists
/// end up in the report, so a user can tell "no energy column" apart from "energy is zero".
#[derive(Default)]
pub struct Discovery {
    pub sensors: Vec<Box<dyn EnergySensor>>,
    /// Why an expected source is missing or unreadable ("NVML not found (no NVIDIA driver)").
    pub unavailable: Vec<String>,
    /// Sources that exist and work but are deliberately left out (double counting).
    pub skipped: Vec<String>,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("sensors", &self.sensor_names())
            .field("unavailable", &self.unavailable)
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl Discovery {
    pub fn sensor_names(&self) -> Vec<String> {
        self.sensors.iter().map(|s| s.name().to_string()).collect()
    }

    /// One line for `n/a (...)` in reports when no sensor was found.
    pub fn na_reason(&self) -> String {
        if self.unavailable.is_empty() {
            "no energy sensor found".to_string()
        } else {
            self.unavailable.join("; ")
        }
    }
}

/// Finds every usable sensor. Never fails: every problem becomes a reason string.
pub fn discover_sensors(opts: &DiscoverOptions) -> Discovery {
    let mut d = Discovery::default();
    if opts.rapl {
        discover_rapl(&opts.sysfs_root, &mut d);
    }
    // RAPL is the better CPU source (it has DRAM, and hwmon CPU drivers mirror the same MSRs),
    // so hwmon CPU counters are only used when RAPL gave none.
    let have_cpu = d
        .sensors
        .iter()
        .any(|s| s.domain() == EnergyDomain::CpuPackage);
    if opts.hwmon {
        discover_hwmon(&opts.sysfs_root, have_cpu, opts.sample_interval, &mut d);
    }
    if opts.nvml {
        discover_nvml(opts.nvml_library.as_deref(), opts.sample_interval, &mut d);
    }
    d
}

/// Reads a sysfs file holding one unsigned integer (trailing newline allowed).
pub(crate) fn read_u64(path: &Path) -> Result<u64, EnergyError> {
    let text = std::fs::read_to_string(path).map_err(|source| EnergyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let t = text.trim();
    t.parse::<u64>().map_err(|_| EnergyError::Parse {
        path: path.to_path_buf(),
        content: t.chars().take(40).collect(),
    })
}

/// Reads a short sysfs text attribute such as `name`, trimmed; `None` when missing or empty.
pub(crate) fn read_trimmed(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Turns a read failure into the reason shown to the user; `permission_hint` is the fix that
/// usually applies to this kind of file when access is denied.
pub(crate) fn describe_read_error(what: &str, e: &EnergyError, permission_hint: &str) -> String {
    match e {
        EnergyError::Io { path, source }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            format!(
                "{what}: {} not readable (permission denied{}{permission_hint})",
                path.display(),
                if permission_hint.is_empty() { "" } else { "; " },
            )
        }
        _ => format!("{what}: {e}"),
    }
}
