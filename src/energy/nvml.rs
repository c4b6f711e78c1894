//! NVIDIA GPU energy through NVML, loaded at run time with `libloading`: the binary must start
//! (and benchmark the CPU) on machines without an NVIDIA driver, so NVML cannot be a link-time
//! dependency. A missing library is the normal case and becomes the reason [`NVML_NOT_FOUND`].
//!
//! Energy comes from `nvmlDeviceGetTotalEnergyConsumption` (a mJ counter, Volta and newer);
//! older GPUs fall back to sampling `nvmlDeviceGetPowerUsage` (mW) and integrating.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use libloading::Library;

use super::counter::{CounterKind, WrappingCounter};
use super::sampled::SampledPowerSensor;
use super::{Discovery, EnergyDomain, EnergyError, EnergySensor};

/// The reason reported when no NVML library can be loaded.
pub const NVML_NOT_FOUND: &str = "NVML not found (no NVIDIA driver)";

#[cfg(windows)]
const LIBRARY_NAMES: &[&str] = &[
    "nvml.dll",
    "C:\\Program Files\\NVIDIA Corporation\\NVSMI\\nvml.dll",
];
#[cfg(all(unix, not(target_os = "macos")))]
const LIBRARY_NAMES: &[&str] = &["libnvidia-ml.so.1", "libnvidia-ml.so"];
#[cfg(not(any(windows, all(unix, not(target_os = "macos")))))]
const LIBRARY_NAMES: &[&str] = &[];

type NvmlReturn = c_int;
const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
const NVML_ERROR_FUNCTION_NOT_FOUND: NvmlReturn = 13;
/// NVML_DEVICE_NAME_V2_BUFFER_SIZE.
const NAME_BUFFER: usize = 96;

/// `nvmlMemory_t` (v1): bytes.
#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

type RawDevice = *mut c_void;

/// An `nvmlDevice_t`. NVML documents all its entry points as thread-safe, and the handle is an
/// opaque pointer owned by the library, so moving it to the sampling thread is sound.
#[derive(Clone, Copy)]
struct DeviceHandle(RawDevice);
// SAFETY: see the type's doc comment; the pointer is never dereferenced on our side.
unsafe impl Send for DeviceHandle {}

/// A loaded and initialised NVML. Shared (`Arc`) by all NVIDIA sensors so the library stays
/// loaded, and `nvmlShutdown` runs once, after the last sensor is gone.
pub struct Nvml {
    shutdown: unsafe extern "C" fn() -> NvmlReturn,
    get_count: unsafe extern "C" fn(*mut c_uint) -> NvmlReturn,
    get_handle: unsafe extern "C" fn(c_uint, *mut RawDevice) -> NvmlReturn,
    get_name: unsafe extern "C" fn(RawDevice, *mut c_char, c_uint) -> NvmlReturn,
    total_energy: Option<unsafe extern "C" fn(RawDevice, *mut c_ulonglong) -> NvmlReturn>,
    power_usage: Option<unsafe extern "C" fn(RawDevice, *mut c_uint) -> NvmlReturn>,
    memory_info: Option<unsafe extern "C" fn(RawDevice, *mut NvmlMemory) -> NvmlReturn>,
    error_string: Option<unsafe extern "C" fn(NvmlReturn) -> *const c_char>,
    /// `nvmlShutdown` must only balance a successful `nvmlInit_v2`.
    initialised: bool,
    // Declared last: the function pointers above point into it.
    _lib: Library,
}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nvml")
    }
}

/// GPU memory as NVML sees it: device-wide, so it includes other processes and the driver.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuMemoryInfo {
    pub index: u32,
    pub name: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
}

impl Nvml {
    /// Loads and initialises NVML, from `library` if given, else from the platform's usual
    /// names. A library that cannot be loaded gives `EnergyError::NvmlLoad(NVML_NOT_FOUND)`.
    pub fn open(library: Option<&Path>) -> Result<Arc<Nvml>, EnergyError> {
        let lib = match library {
            Some(p) => load(p.as_os_str()),
            None => LIBRARY_NAMES.iter().find_map(|n| load(n.as_ref())),
        }
        .ok_or_else(|| EnergyError::NvmlLoad(NVML_NOT_FOUND.to_string()))?;

        // SAFETY: the signatures match nvml.h; the pointers are kept next to the library.
        unsafe {
            let init = *lib
                .get::<unsafe extern "C" fn() -> NvmlReturn>(b"nvmlInit_v2\0")
                .map_err(|e| EnergyError::NvmlLoad(format!("no nvmlInit_v2: {e}")))?;
            let mut nvml = Nvml {
                shutdown: required(&lib, b"nvmlShutdown\0")?,
                get_count: required(&lib, b"nvmlDeviceGetCount_v2\0")?,
                get_handle: required(&lib, b"nvmlDeviceGetHandleByIndex_v2\0")?,
                get_name: required(&lib, b"nvmlDeviceGetName\0")?,
                total_energy: optional(&lib, b"nvmlDeviceGetTotalEnergyConsumption\0"),
                power_usage: optional(&lib, b"nvmlDeviceGetPowerUsage\0"),
                memory_info: optional(&lib, b"nvmlDeviceGetMemoryInfo\0"),
                error_string: optional(&lib, b"nvmlErrorString\0"),
                initialised: false,
                _lib: lib,
            };
            let rc = init();
            if rc != NVML_SUCCESS {
                return Err(nvml.error("nvmlInit_v2", rc));
            }
            nvml.initialised = true;
            Ok(Arc::new(nvml))
        }
    }

    fn error(&self, call: &'static str, code: NvmlReturn) -> EnergyError {
        let message = self
            .error_string
            // SAFETY: nvmlErrorString returns a static NUL-terminated string (or NULL).
            .map(|f| unsafe { f(code) })
            .filter(|p| !p.is_null())
            .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unknown error".to_string());
        EnergyError::Nvml {
            call,
            code,
            message,
        }
    }

    fn check(&self, call: &'static str, code: NvmlReturn) -> Result<(), EnergyError> {
        if code == NVML_SUCCESS {
            Ok(())
        } else {
            Err(self.error(call, code))
        }
    }

    pub fn device_count(&self) -> Result<u32, EnergyError> {
        let mut n: c_uint = 0;
        // SAFETY: valid out-pointer.
        let rc = unsafe { (self.get_count)(&mut n) };
        self.check("nvmlDeviceGetCount_v2", rc)?;
        Ok(n)
    }

    fn handle(&self, index: u32) -> Result<DeviceHandle, EnergyError> {
        let mut dev: RawDevice = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let rc = unsafe { (self.get_handle)(index, &mut dev) };
        self.check("nvmlDeviceGetHandleByIndex_v2", rc)?;
        Ok(DeviceHandle(dev))
    }

    pub fn device_name(&self, index: u32) -> Result<String, EnergyError> {
        let dev = self.handle(index)?;
        self.name_of(dev)
    }

    fn name_of(&self, dev: DeviceHandle) -> Result<String, EnergyError> {
        let mut buf = [0u8; NAME_BUFFER];
        // SAFETY: the buffer length is passed along; NVML writes a NUL-terminated string.
        let rc = unsafe { (self.get_name)(dev.0, buf.as_mut_ptr().cast(), NAME_BUFFER as c_uint) };
        self.check("nvmlDeviceGetName", rc)?;
        Ok(CStr::from_bytes_until_nul(&buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| String::from_utf8_lossy(&buf).into_owned()))
    }

    /// Total energy since the driver loaded, in millijoules.
    fn total_energy_mj(&self, dev: DeviceHandle) -> Result<u64, EnergyError> {
        let f = self.total_energy.ok_or_else(|| {
            self.error(
                "nvmlDeviceGetTotalEnergyConsumption",
                NVML_ERROR_FUNCTION_NOT_FOUND,
            )
        })?;
        let mut mj: c_ulonglong = 0;
        // SAFETY: valid out-pointer.
        let rc = unsafe { f(dev.0, &mut mj) };
        self.check("nvmlDeviceGetTotalEnergyConsumption", rc)?;
        Ok(mj)
    }

    /// Current board power in watts.
    fn power_w(&self, dev: &DeviceHandle) -> Result<f64, EnergyError> {
        let f = self
            .power_usage
            .ok_or_else(|| self.error("nvmlDeviceGetPowerUsage", NVML_ERROR_FUNCTION_NOT_FOUND))?;
        let mut mw: c_uint = 0;
        // SAFETY: valid out-pointer.
        let rc = unsafe { f(dev.0, &mut mw) };
        self.check("nvmlDeviceGetPowerUsage", rc)?;
        Ok(f64::from(mw) / 1e3)
    }

    pub fn memory_info(&self, index: u32) -> Result<GpuMemoryInfo, EnergyError> {
        let dev = self.handle(index)?;
        let f = self
            .memory_info
            .ok_or_else(|| self.error("nvmlDeviceGetMemoryInfo", NVML_ERROR_FUNCTION_NOT_FOUND))?;
        let mut m = NvmlMemory::default();
        // SAFETY: valid out-pointer to a struct with nvmlMemory_t's layout.
        let rc = unsafe { f(dev.0, &mut m) };
        self.check("nvmlDeviceGetMemoryInfo", rc)?;
        Ok(GpuMemoryInfo {
            index,
            name: self.name_of(dev)?,
            used_bytes: m.used,
            total_bytes: m.total,
        })
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        if self.initialised {
            // SAFETY: balances the successful nvmlInit_v2 in `open`.
            unsafe {
                (self.shutdown)();
            }
        }
    }
}

fn load(name: &std::ffi::OsStr) -> Option<Library> {
    // SAFETY: loading NVML runs its initialisers, which are well behaved.
    unsafe { Library::new(name) }.ok()
}

unsafe fn required<T: Copy>(lib: &Library, sym: &[u8]) -> Result<T, EnergyError> {
    lib.get::<T>(sym).map(|s| *s).map_err(|e| {
        EnergyError::NvmlLoad(format!(
            "missing {}: {e}",
            String::from_utf8_lossy(&sym[..sym.len().saturating_sub(1)])
        ))
    })
}

unsafe fn optional<T: Copy>(lib: &Library, sym: &[u8]) -> Option<T> {
    lib.get::<T>(sym).ok().map(|s| *s)
}

/// One NVIDIA GPU's cumulative energy counter (Volta and newer).
pub struct NvmlEnergySensor {
    name: String,
    nvml: Arc<Nvml>,
    device: DeviceHandle,
    counter: WrappingCounter,
}

impl NvmlEnergySensor {
    /// Reads the counter once: a GPU without it fails here with `NOT_SUPPORTED`, which
    /// discovery answers by falling back to power sampling.
    pub fn open(nvml: Arc<Nvml>, index: u32, name: impl Into<String>) -> Result<Self, EnergyError> {
        let device = nvml.handle(index)?;
        let mut s = NvmlEnergySensor {
            name: name.into(),
            nvml,
            device,
            // mJ since driver load in 64 bits: backwards only after a driver reload.
            counter: WrappingCounter::new(CounterKind::Resetting),
        };
        s.read_energy_j()?;
        Ok(s)
    }
}

impl EnergySensor for NvmlEnergySensor {
    fn name(&self) -> &str {
        &self.name
    }

    fn domain(&self) -> EnergyDomain {
        EnergyDomain::Gpu
    }

    fn read_energy_j(&mut self) -> Result<f64, EnergyError> {
        let mj = self.nvml.total_energy_mj(self.device)?;
        Ok(self.counter.update(mj) as f64 / 1e3)
    }
}

/// Adds one sensor per NVIDIA GPU to `d`; a missing NVML becomes the reason [`NVML_NOT_FOUND`].
pub fn discover_nvml(library: Option<&Path>, interval: Duration, d: &mut Discovery) {
    let nvml = match Nvml::open(library) {
        Ok(n) => n,
        Err(EnergyError::NvmlLoad(msg)) if msg == NVML_NOT_FOUND => {
            d.unavailable.push(msg);
            return;
        }
        Err(e) => {
            d.unavailable.push(e.to_string());
            return;
        }
    };
    let count = match nvml.device_count() {
        Ok(0) => {
            d.unavailable
                .push("NVML: driver loaded but no NVIDIA GPU found".to_string());
            return;
        }
        Ok(n) => n,
        Err(e) => {
            d.unavailable.push(e.to_string());
            return;
        }
    };
    for index in 0..count {
        let gpu = nvml
            .device_name(index)
            .unwrap_or_else(|_| "NVIDIA GPU".to_string());
        let name = if count > 1 {
            format!("NVML {gpu} #{index}")
        } else {
            format!("NVML {gpu}")
        };
        match NvmlEnergySensor::open(nvml.clone(), index, name.clone()) {
            Ok(s) => {
                d.sensors.push(Box::new(s));
                continue;
            }
            Err(EnergyError::Nvml { code, .. })
                if code == NVML_ERROR_NOT_SUPPORTED || code == NVML_ERROR_FUNCTION_NOT_FOUND => {}
            Err(e) => {
                d.unavailable.push(format!("{name}: {e}"));
                continue;
            }
        }
        // Pre-Volta: no energy counter, integrate board power instead.
        let dev = match nvml.handle(index) {
            Ok(h) => h,
            Err(e) => {
                d.unavailable.push(format!("{name}: {e}"));
                continue;
            }
        };
        let n2 = nvml.clone();
        let sampled = SampledPowerSensor::spawn(
            format!("{name} (sampled power)"),
            EnergyDomain::Gpu,
            interval,
            move || n2.power_w(&dev),
        );
        match sampled {
            Ok(s) => d.sensors.push(Box::new(s)),
            Err(e) => d.unavailable.push(format!(
                "{name}: no energy counter and no power reading: {e}"
            )),
        }
    }
}

/// Memory used on every NVIDIA GPU, for the report's GPU memory column. `Err` carries the
/// reason (usually [`NVML_NOT_FOUND`]) for printing `n/a`.
pub fn nvml_memory_info(library: Option<&Path>) -> Result<Vec<GpuMemoryInfo>, String> {
    let nvml = Nvml::open(library).map_err(|e| match e {
        EnergyError::NvmlLoad(m) => m,
        e => e.to_string(),
    })?;
    let n = nvml.device_count().map_err(|e| e.to_string())?;
    (0..n)
        .map(|i| nvml.memory_info(i).map_err(|e| e.to_string()))
        .collect()
}
