//! Turning sensors into per-test energy: snapshot before, snapshot after, subtract.

use std::time::{Duration, Instant};

use super::{EnergyDomain, EnergyError, EnergySensor};

/// A wall power declared by the user (`--power-watts W`, read off a plug-in meter). It is the
/// only energy source on machines without counters; it yields joules = W × seconds and every
/// reading made from it carries `is_estimate = true` so reports label it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WallMeterEstimate {
    pub watts: f64,
    /// Declared idle wall power, if the user gave one: an estimate cannot measure idle itself.
    pub idle_watts: Option<f64>,
}

impl WallMeterEstimate {
    pub fn new(watts: f64) -> Self {
        WallMeterEstimate {
            watts,
            idle_watts: None,
        }
    }

    /// "declared wall power 35 W (estimate)".
    pub fn source(&self) -> String {
        format!("declared wall power {} W (estimate)", self.watts)
    }
}

/// Sensor values at the start of a measured span.
#[derive(Debug, Clone)]
pub struct EnergySnapshot {
    at: Instant,
    joules: Vec<f64>,
}

/// Energy over one span.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EnergyReading {
    /// Per sensor: name, domain, joules over the span.
    pub joules_by_sensor: Vec<(String, EnergyDomain, f64)>,
    pub total_j: f64,
    pub seconds: f64,
    /// True when the joules come from a declared wall power rather than a counter.
    pub is_estimate: bool,
    /// Where the numbers come from: the sensor names, or the declared wall power.
    pub source: String,
}

impl EnergyReading {
    pub fn average_watts(&self) -> f64 {
        if self.seconds > 0.0 {
            self.total_j / self.seconds
        } else {
            0.0
        }
    }

    /// Joules the workload added on top of what the machine draws doing nothing.
    pub fn above_idle_j(&self, idle: &IdleBaseline) -> f64 {
        energy_above_idle(self.total_j, idle.watts, self.seconds)
    }

    pub fn sensor_names(&self) -> Vec<String> {
        self.joules_by_sensor
            .iter()
            .map(|(n, _, _)| n.clone())
            .collect()
    }
}

/// Average power of the idle machine, measured before the workload so that "energy per token"
/// can be reported both as the wall-socket truth (total) and as the part the model caused.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct IdleBaseline {
    pub watts: f64,
    pub seconds: f64,
    pub is_estimate: bool,
}

/// `total_j - idle_watts * seconds`. Not clamped at 0: a slightly negative value is what the
/// measurement says (noise on a nearly idle workload), and hiding it would invent a number.
pub fn energy_above_idle(total_j: f64, idle_watts: f64, seconds: f64) -> f64 {
    total_j - idle_watts * seconds
}

/// Owns the sensors of one benchmark run (or a declared wall power).
pub struct EnergyMeter {
    sensors: Vec<Box<dyn EnergySensor>>,
    estimate: Option<WallMeterEstimate>,
}

impl std::fmt::Debug for EnergyMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnergyMeter")
            .field("sensors", &self.sensor_names())
            .field("estimate", &self.estimate)
            .finish()
    }
}

impl EnergyMeter {
    /// A meter over measured sensors (usually `discover_sensors(..).sensors`).
    pub fn new(sensors: Vec<Box<dyn EnergySensor>>) -> Self {
        EnergyMeter {
            sensors,
            estimate: None,
        }
    }

    /// A meter over a declared wall power only. Sensors are deliberately not combined with it:
    /// a wall meter already includes the CPU and GPU, adding them would count them twice.
    pub fn from_estimate(estimate: WallMeterEstimate) -> Self {
        EnergyMeter {
            sensors: Vec::new(),
            estimate: Some(estimate),
        }
    }

    /// True when the meter cannot measure anything (the report should print `n/a`).
    pub fn is_empty(&self) -> bool {
        self.sensors.is_empty() && self.estimate.is_none()
    }

    pub fn is_estimate(&self) -> bool {
        self.estimate.is_some()
    }

    pub fn sensor_names(&self) -> Vec<String> {
        match &self.estimate {
            Some(e) => vec![e.source()],
            None => self.sensors.iter().map(|s| s.name().to_string()).collect(),
        }
    }

    /// "RAPL package-0 + RAPL dram", or the declared wall power.
    pub fn source(&self) -> String {
        self.sensor_names().join(" + ")
    }

    fn read_all(&mut self) -> Result<Vec<f64>, EnergyError> {
        self.sensors.iter_mut().map(|s| s.read_energy_j()).collect()
    }

    /// Reads every sensor once and discards the values. Long spans should call this every few
    /// seconds (e.g. between repetitions): a RAPL counter that wraps twice between two reads
    /// would lose a whole wrap period, and unwrapping only sees reads.
    pub fn poll(&mut self) -> Result<(), EnergyError> {
        self.read_all().map(|_| ())
    }

    pub fn start(&mut self) -> Result<EnergySnapshot, EnergyError> {
        if self.is_empty() {
            return Err(EnergyError::NoSensors);
        }
        let joules = self.read_all()?;
        Ok(EnergySnapshot {
            at: Instant::now(),
            joules,
        })
    }

    pub fn stop(&mut self, start: &EnergySnapshot) -> Result<EnergyReading, EnergyError> {
        if self.is_empty() {
            return Err(EnergyError::NoSensors);
        }
        let now = self.read_all()?;
        let seconds = start.at.elapsed().as_secs_f64();
        if let Some(e) = &self.estimate {
            let j = e.watts * seconds;
            return Ok(EnergyReading {
                joules_by_sensor: vec![(e.source(), EnergyDomain::Other, j)],
                total_j: j,
                seconds,
                is_estimate: true,
                source: e.source(),
            });
        }
        if now.len() != start.joules.len() {
            return Err(EnergyError::SnapshotMismatch {
                snapshot: start.joules.len(),
                meter: now.len(),
            });
        }
        let joules_by_sensor: Vec<(String, EnergyDomain, f64)> = self
            .sensors
            .iter()
            .zip(now.iter().zip(&start.joules))
            .map(|(s, (b, a))| (s.name().to_string(), s.domain(), b - a))
            .collect();
        let total_j = joules_by_sensor.iter().map(|(_, _, j)| j).sum();
        Ok(EnergyReading {
            joules_by_sensor,
            total_j,
            seconds,
            is_estimate: false,
            source: self.source(),
        })
    }

    /// Measures the idle machine for `duration` (run it before loading the workload, with
    /// nothing else running). For a declared wall power this returns the declared idle power, or
    /// `None` when none was declared: idle cannot be measured from a declaration.
    pub fn measure_idle(
        &mut self,
        duration: Duration,
    ) -> Result<Option<IdleBaseline>, EnergyError> {
        if let Some(e) = &self.estimate {
            return Ok(e.idle_watts.map(|w| IdleBaseline {
                watts: w,
                seconds: 0.0,
                is_estimate: true,
            }));
        }
        let snap = self.start()?;
        let end = snap.at + duration;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_secs(1)));
            self.poll()?;
        }
        let r = self.stop(&snap)?;
        Ok(Some(IdleBaseline {
            watts: r.average_watts(),
            seconds: r.seconds,
            is_estimate: false,
        }))
    }
}
