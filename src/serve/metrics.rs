//! State shared by the HTTP side and the scheduler thread (readiness, queue length) and the
//! counters `/metrics` prints in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::energy::{EnergyMeter, EnergySnapshot};
use crate::tokenizer::Tokenizer;

/// What the HTTP side needs once the model is loaded.
pub struct Loaded {
    pub tokenizer: Arc<Tokenizer>,
    pub model_name: String,
    pub ctx: usize,
    pub slots: usize,
    pub backend: String,
}

/// Upper bounds of the rows-per-step histogram.
const ROW_BUCKETS: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

#[derive(Default)]
pub struct Shared {
    pub loaded: OnceLock<Loaded>,
    /// Why loading failed (the server then answers 503 with this).
    pub load_error: OnceLock<String>,
    pub shutting_down: AtomicBool,
    /// Requests submitted and not yet given a slot (the `--queue` limit applies to this).
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose keys and values were already in the slot's cache (not computed).
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed_steps: AtomicU64,
    steps: AtomicU64,
    step_rows: AtomicU64,
    step_micros: AtomicU64,
    row_buckets: [AtomicU64; ROW_BUCKETS.len()],
    /// Generated tokens per second over the last window of about a second.
    tokens_per_s: AtomicU64, // f64 bits
    window: Mutex<Window>,
    /// (endpoint, HTTP status) → responses.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    energy: Mutex<Option<Energy>>,
}

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    generated_at_start: u64,
}

struct Energy {
    meter: EnergyMeter,
    start: EnergySnapshot,
    source: String,
}

impl Shared {
    /// Starts counting joules when the machine has an energy sensor (RAPL, hwmon, NVML).
    pub fn start_energy(&self) {
        let d = crate::energy::discover_sensors(&Default::default());
        if d.sensors.is_empty() {
            return;
        }
        let mut meter = EnergyMeter::new(d.sensors);
        if let Ok(start) = meter.start() {
            let source = meter.source();
            *self.energy.lock().expect("energy lock") = Some(Energy {
                meter,
                start,
                source,
            });
        }
    }

    pub fn record_request(&self, endpoint: &str, status: u16) {
        *self
            .requests
            .lock()
            .expect("requests lock")
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
    }

    pub fn record_step(&self, rows: usize, took: Duration) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.step_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if let Some(b) = ROW_BUCKETS.iter().position(|&b| rows <= b) {
            self.row_buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        let mut w = self.window.lock().expect("window lock");
        let now = Instant::now();
        let generated = self.generated_tokens.load(Ordering::Relaxed);
        match w.start {
            Some(t) if now - t >= Duration::from_secs(1) => {
                let rate = (generated - w.generated_at_start) as f64 / (now - t).as_secs_f64();
                self.tokens_per_s.store(rate.to_bits(), Ordering::Relaxed);
                *w = Window {
                    start: Some(now),
                    generated_at_start: generated,
                };
            }
            Some(_) => {}
            None => {
                *w = Window {
                    start: Some(now),
                    generated_at_start: generated,
                }
            }
        }
    }

    /// The scheduler has nothing to run: the rate drops to 0.
    pub fn idle(&self) {
        self.tokens_per_s.store(0f64.to_bits(), Ordering::Relaxed);
        *self.window.lock().expect("window lock") = Window::default();
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(o, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let requests: Vec<(String, String)> = self
            .requests
            .lock()
            .expect("requests lock")
            .iter()
            .map(|((e, s), n)| {
                (
                    format!("{{endpoint=\"{e}\",status=\"{s}\"}}"),
                    n.to_string(),
                )
            })
            .collect();
        metric(
            "bitnet_requests_total",
            "counter",
            "HTTP responses by endpoint and status.",
            &requests,
        );
        metric(
            "bitnet_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            &one(ld(&self.prompt_tokens)),
        );
        metric(
            "bitnet_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens found in a slot's cache (a conversation's earlier turns), not computed.",
            &one(ld(&self.cached_prompt_tokens)),
        );
        metric(
            "bitnet_generated_tokens_total",
            "counter",
            "Tokens generated.",
            &one(ld(&self.generated_tokens)),
        );
        metric(
            "bitnet_cancelled_requests_total",
            "counter",
            "Requests whose client went away before the end.",
            &one(ld(&self.cancelled)),
        );
        metric(
            "bitnet_failed_steps_total",
            "counter",
            "Model steps that failed (their sequences got an error).",
            &one(ld(&self.failed_steps)),
        );
        metric(
            "bitnet_running_sequences",
            "gauge",
            "Sequences holding a KV-cache slot.",
            &one(self.running.load(Ordering::Relaxed).to_string()),
        );
        metric(
            "bitnet_waiting_sequences",
            "gauge",
            "Sequences queued for a slot.",
            &one(self.waiting.load(Ordering::Relaxed).to_string()),
        );
        let mut buckets = Vec::new();
        let mut cum = 0;
        for (b, n) in ROW_BUCKETS.iter().zip(&self.row_buckets) {
            cum += n.load(Ordering::Relaxed);
            buckets.push((format!("_bucket{{le=\"{b}\"}}"), cum.to_string()));
        }
        let steps = self.steps.load(Ordering::Relaxed);
        buckets.push(("_bucket{le=\"+Inf\"}".into(), steps.to_string()));
        buckets.push(("_sum".into(), ld(&self.step_rows)));
        buckets.push(("_count".into(), steps.to_string()));
        metric(
            "bitnet_step_rows",
            "histogram",
            "Rows (tokens of all sequences) per model step: the batch size.",
            &buckets,
        );
        metric(
            "bitnet_step_seconds_total",
            "counter",
            "Time spent in model steps.",
            &one(format!(
                "{}",
                self.step_micros.load(Ordering::Relaxed) as f64 * 1e-6
            )),
        );
        metric(
            "bitnet_tokens_per_second",
            "gauge",
            "Generated tokens per second over the last second of work.",
            &one(format!(
                "{}",
                f64::from_bits(self.tokens_per_s.load(Ordering::Relaxed))
            )),
        );
        if let Some(e) = self.energy.lock().expect("energy lock").as_mut() {
            if let Ok(r) = e.meter.stop(&e.start) {
                let label = format!("{{source=\"{}\"}}", e.source.replace('"', "'"));
                metric(
                    "bitnet_energy_joules_total",
                    "counter",
                    "Energy measured by the machine's sensors since the server started.",
                    &[(label.clone(), format!("{}", r.total_j))],
                );
                let generated = self.generated_tokens.load(Ordering::Relaxed);
                if generated > 0 {
                    metric(
                        "bitnet_joules_per_token",
                        "gauge",
                        "Measured energy (idle included) over generated tokens since start.",
                        &[(label, format!("{}", r.total_j / generated as f64))],
                    );
                }
            }
        }
        o
    }
}
