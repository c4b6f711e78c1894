//! Sensors that only report instantaneous power (hwmon `power*_average` on AMD GPUs, NVML on
//! pre-Volta NVIDIA GPUs) become energy counters by sampling power on a background thread and
//! integrating with the trapezoid rule.
//!
//! A read does not just return the integral up to the last periodic sample: it asks the thread
//! to take a sample *now*, so a measured span ends exactly when the caller asked and the error is
//! bounded by how power varies between samples, not by the sampling period.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{read_u64, EnergyDomain, EnergyError, EnergySensor};

/// 50 ms: fine enough to follow decode steps of a small model, cheap enough (one sysfs read or
/// one NVML call) not to disturb the benchmark.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// Energy in joules from `(seconds, watts)` samples ordered by time, by the trapezoid rule.
/// Fewer than two samples span no time and give 0.
pub fn integrate_trapezoid(samples: &[(f64, f64)]) -> f64 {
    samples
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) * 0.5)
        .sum()
}

type Reply = mpsc::Sender<Result<f64, EnergyError>>;

/// Energy from a power reading, integrated on a background thread. The thread stops when the
/// sensor is dropped.
pub struct SampledPowerSensor {
    name: String,
    domain: EnergyDomain,
    requests: Option<mpsc::Sender<Reply>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SampledPowerSensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampledPowerSensor")
            .field("name", &self.name)
            .field("domain", &self.domain)
            .finish()
    }
}

struct Integrator {
    start: Instant,
    last: Option<(f64, f64)>,
    joules: f64,
}

impl Integrator {
    fn add(&mut self, watts: f64) {
        let t = self.start.elapsed().as_secs_f64();
        if let Some(prev) = self.last {
            self.joules += integrate_trapezoid(&[prev, (t, watts)]);
        }
        self.last = Some((t, watts));
    }
}

impl SampledPowerSensor {
    /// Starts sampling `read_watts` every `interval`. The first sample is taken before this
    /// returns, and its error is returned, so a source that cannot be read is rejected at
    /// discovery time instead of producing an empty integral later.
    pub fn spawn<F>(
        name: impl Into<String>,
        domain: EnergyDomain,
        interval: Duration,
        mut read_watts: F,
    ) -> Result<Self, EnergyError>
    where
        F: FnMut() -> Result<f64, EnergyError> + Send + 'static,
    {
        let name = name.into();
        let (req_tx, req_rx) = mpsc::channel::<Reply>();
        let (first_tx, first_rx) = mpsc::channel::<Result<(), EnergyError>>();
        let interval = interval.max(Duration::from_millis(1));
        let thread_name = format!("power-sampler {name}");
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let mut integ = Integrator {
                    start: Instant::now(),
                    last: None,
                    joules: 0.0,
                };
                match read_watts() {
                    Ok(w) => {
                        integ.add(w);
                        let _ = first_tx.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = first_tx.send(Err(e));
                        return;
                    }
                }
                let mut next = Instant::now() + interval;
                loop {
                    let wait = next.saturating_duration_since(Instant::now());
                    match req_rx.recv_timeout(wait) {
                        Ok(reply) => {
                            let r = read_watts().map(|w| {
                                integ.add(w);
                                integ.joules
                            });
                            let _ = reply.send(r);
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            // A failed periodic sample is simply skipped: the next good one
                            // bridges the gap linearly.
                            if let Ok(w) = read_watts() {
                                integ.add(w);
                            }
                            next = Instant::now() + interval;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            })
            .map_err(|e| EnergyError::NoSamples {
                sensor: name.clone(),
                last_error: format!("cannot start sampling thread: {e}"),
            })?;
        match first_rx.recv() {
            Ok(Ok(())) => Ok(SampledPowerSensor {
                name,
                domain,
                requests: Some(req_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EnergyError::SamplerStopped(name))
            }
        }
    }

    /// Samples a sysfs file holding power in microwatts (hwmon `power*_average`/`power*_input`).
    pub fn from_microwatt_file(
        name: impl Into<String>,
        domain: EnergyDomain,
        path: impl Into<std::path::PathBuf>,
        interval: Duration,
    ) -> Result<Self, EnergyError> {
        let path = path.into();
        Self::spawn(name, domain, interval, move || {
            read_u64(&path).map(|uw| uw as f64 / 1e6)
        })
    }
}

impl EnergySensor for SampledPowerSensor {
    fn name(&self) -> &str {
        &self.name
    }

    fn domain(&self) -> EnergyDomain {
        self.domain
    }

    fn read_energy_j(&mut self) -> Result<f64, EnergyError> {
        let stopped = || EnergyError::SamplerStopped(self.name.clone());
        let requests = self.requests.as_ref().ok_or_else(stopped)?;
        let (tx, rx) = mpsc::channel();
        requests.send(tx).map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())?
    }
}

impl Drop for SampledPowerSensor {
    fn drop(&mut self) {
        // Closing the request channel is the thread's signal to exit.
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
