//! Unwrapping of hardware energy counters, shared by the RAPL, hwmon and NVML sensors so the
//! overflow logic is written (and tested) once.

/// What a counter going *backwards* means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterKind {
    /// The counter runs from 0 to `max` and then starts again at 0 (RAPL `energy_uj`, whose
    /// `max_energy_range_uj` is reached in minutes at high power). Going backwards means it
    /// wrapped exactly once, which holds as long as it is read at least once per wrap period.
    Wrapping { max: u64 },
    /// A 64-bit counter that never wraps in practice (hwmon `energy*_input`, NVML total energy).
    /// Going backwards means the driver was reloaded and the counter restarted from 0.
    Resetting,
}

/// A monotonic view of a raw counter: feed it raw readings, get the cumulative value back.
#[derive(Debug, Clone)]
pub struct WrappingCounter {
    kind: CounterKind,
    last: Option<u64>,
    total: u128,
}

impl WrappingCounter {
    pub fn new(kind: CounterKind) -> Self {
        WrappingCounter {
            kind,
            last: None,
            total: 0,
        }
    }

    pub fn kind(&self) -> CounterKind {
        self.kind
    }

    /// Feeds one raw reading and returns the unwrapped cumulative value, in the counter's units.
    /// The first reading is the origin (the returned value starts at the raw value itself, so
    /// until the first wrap the output equals the hardware counter).
    pub fn update(&mut self, raw: u64) -> u128 {
        match self.last {
            None => self.total = u128::from(raw),
            Some(last) => {
                let delta = if raw >= last {
                    raw - last
                } else {
                    match self.kind {
                        // The counter went last → max, then 0 → raw.
                        CounterKind::Wrapping { max } => max.saturating_sub(last) + raw,
                        CounterKind::Resetting => raw,
                    }
                };
                self.total += u128::from(delta);
            }
        }
        self.last = Some(raw);
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_once() {
        let mut c = WrappingCounter::new(CounterKind::Wrapping { max: 1000 });
        assert_eq!(c.update(900), 900);
        assert_eq!(c.update(950), 950);
        // 950 → 1000 (50), then 0 → 30 (30).
        assert_eq!(c.update(30), 1030);
        assert_eq!(c.update(40), 1040);
    }

    #[test]
    fn resetting_counts_from_zero() {
        let mut c = WrappingCounter::new(CounterKind::Resetting);
        assert_eq!(c.update(500), 500);
        assert_eq!(c.update(20), 520);
    }
}
