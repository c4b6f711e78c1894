//! Benchmark results and their three renderings: a markdown table shaped like llama-bench's
//! (so the two can be pasted next to each other), JSON for tools, and CSV for spreadsheets.
//!
//! Missing measurements stay missing: energy without a sensor is `n/a` with the reason in
//! md/CSV and `null` plus `energy_na_reason` in JSON, and estimates are marked as such.

use std::fmt::Write as _;
use std::str::FromStr;

use serde::Serialize;

use super::stats::Summary;
use crate::energy::{EnergyReading, IdleBaseline};

/// Energy of one test, from an [`EnergyReading`] over its timed repetitions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnergyResult {
    /// Joules per token over the whole span: prefill J/token for a `pp` test, decode J/token for
    /// a `tg` test.
    pub joules_per_token: f64,
    pub average_watts: f64,
    /// Idle power measured before the run, when it was measured (or declared, for estimates).
    pub idle_watts: Option<f64>,
    /// `(total − idle × seconds) / tokens`: what the model itself cost. Can be slightly negative
    /// when the workload is lighter than the noise of the idle measurement.
    pub joules_per_token_above_idle: Option<f64>,
    pub total_j: f64,
    pub seconds: f64,
    pub tokens: u64,
    /// Sensor names ("RAPL package-0", "NVML NVIDIA H100"), or the declared wall power.
    pub sensors: Vec<String>,
    /// True when the joules come from `--power-watts` rather than a hardware counter.
    pub is_estimate: bool,
}

impl EnergyResult {
    /// `tokens` is every token processed during the reading (n_tokens × repetitions).
    /// `None` when no token or no time was measured: a per-token figure would be made up.
    pub fn from_reading(
        reading: &EnergyReading,
        tokens: u64,
        idle: Option<&IdleBaseline>,
    ) -> Option<EnergyResult> {
        if tokens == 0 || reading.seconds <= 0.0 || !reading.total_j.is_finite() {
            return None;
        }
        let per_tok = |j: f64| j / tokens as f64;
        Some(EnergyResult {
            joules_per_token: per_tok(reading.total_j),
            average_watts: reading.average_watts(),
            idle_watts: idle.map(|i| i.watts),
            joules_per_token_above_idle: idle.map(|i| per_tok(reading.above_idle_j(i))),
            total_j: reading.total_j,
            seconds: reading.seconds,
            tokens,
            sensors: reading.sensor_names(),
            is_estimate: reading.is_estimate,
        })
    }
}

/// One row of the report: one test (`pp512`, `tg128`, `pp512 @ d1024`) on one configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchResult {
    pub model: String,
    pub model_size_bytes: u64,
    pub params: u64,
    /// "cpu", "wgpu Vulkan NVIDIA H100", ...
    pub backend: String,
    pub threads: usize,
    /// llama-bench's test name: "pp512", "tg128", "pp512 @ d1024".
    pub test: String,
    /// Tokens per sequence.
    pub n_tokens: usize,
    pub depth: usize,
    /// Sequences decoded together (1 but for a batched decode test, `tg128 x8`).
    pub batch: usize,
    /// The LM head's storage (`--lm-head`): "exact", "q8" or "q4".
    pub lm_head: String,
    /// The KV cache's storage (`--kv-cache` or the device's default): "f32" or "f16".
    pub kv_cache: String,
    pub tokens_per_s: Summary,
    pub energy: Option<EnergyResult>,
    /// Why `energy` is missing ("no RAPL in this machine: ..."); `None` when energy is present.
    pub energy_na_reason: Option<String>,
    pub peak_rss_bytes: Option<u64>,
    pub gpu_mem_bytes: Option<u64>,
    /// Host-side work per token on the GPU backend (`None` on the CPU).
    pub gpu_work: Option<GpuWork>,
}

/// What the host did per token of a GPU test, averaged over the timed repetitions: counted
/// by the wgpu backend (`GpuCounters`), not estimated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GpuWork {
    pub dispatches_per_token: f64,
    pub submits_per_token: f64,
    /// Blocking waits of the host on the device (read-backs).
    pub waits_per_token: f64,
    /// Host time recording and submitting command buffers.
    pub encode_us_per_token: f64,
}

impl BenchResult {
    /// Sets `energy` or `energy_na_reason`, keeping the two consistent.
    pub fn set_energy(&mut self, energy: Result<EnergyResult, String>) {
        match energy {
            Ok(e) => {
                self.energy = Some(e);
                self.energy_na_reason = None;
            }
            Err(reason) => {
                self.energy = None;
                self.energy_na_reason = Some(reason);
            }
        }
    }
}

/// `--output md|json|csv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Md,
    Json,
    Csv,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown output format {0:?} (expected md, json or csv)")]
pub struct ParseOutputFormatError(pub String);

impl FromStr for OutputFormat {
    type Err = ParseOutputFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "md" | "markdown" => Ok(OutputFormat::Md),
            "json" => Ok(OutputFormat::Json),
            "csv" => Ok(OutputFormat::Csv),
            _ => Err(ParseOutputFormatError(s.to_string())),
        }
    }
}

impl std::fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OutputFormat::Md => "md",
            OutputFormat::Json => "json",
            OutputFormat::Csv => "csv",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("JSON serialisation failed: {0}")]
    Json(#[from] serde_json::Error),
}

/// Renders `results` in `format`.
pub fn render(format: OutputFormat, results: &[BenchResult]) -> Result<String, ReportError> {
    Ok(match format {
        OutputFormat::Md => render_markdown(results),
        OutputFormat::Json => render_json(results)?,
        OutputFormat::Csv => render_csv(results),
    })
}

const NA: &str = "n/a";

/// llama-bench's size column: MiB under 1 GiB, else GiB, two decimals.
pub fn format_size(bytes: u64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    let b = bytes as f64;
    if b < GIB {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", b / GIB)
    }
}

/// llama-bench's params column: "2.41 B", or "125.00 M" under a billion.
pub fn format_params(n: u64) -> String {
    let x = n as f64;
    if x < 1e9 {
        format!("{:.2} M", x / 1e6)
    } else {
        format!("{:.2} B", x / 1e9)
    }
}

/// Three significant digits: J/token spans 0.001 (GPU prefill) to 10 (slow CPU decode), so a
/// fixed number of decimals would either hide small values or print noise on large ones.
pub fn format_sig3(x: f64) -> String {
    if !x.is_finite() {
        return NA.to_string();
    }
    if x == 0.0 {
        return "0.00".to_string();
    }
    let mag = x.abs().log10().floor() as i32;
    let decimals = (2 - mag).clamp(0, 9) as usize;
    format!("{x:.decimals$}")
}

fn fmt_opt_bytes(b: Option<u64>) -> String {
    b.map(format_size).unwrap_or_else(|| NA.to_string())
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// Energy columns of the markdown table, estimates prefixed with `~`.
fn md_energy_cells(r: &BenchResult) -> [String; 4] {
    match &r.energy {
        None => [NA, NA, NA, NA].map(String::from),
        Some(e) => {
            let mark = if e.is_estimate { "~" } else { "" };
            let w = |x: f64| {
                if x.is_finite() {
                    format!("{mark}{x:.1}")
                } else {
                    NA.to_string()
                }
            };
            let j = |x: f64| {
                let s = format_sig3(x);
                if x.is_finite() {
                    format!("{mark}{s}")
                } else {
                    s
                }
            };
            [
                j(e.joules_per_token),
                w(e.average_watts),
                e.idle_watts.map(w).unwrap_or_else(|| NA.to_string()),
                e.joules_per_token_above_idle
                    .map(j)
                    .unwrap_or_else(|| NA.to_string()),
            ]
        }
    }
}

/// The markdown table, padded like llama-bench's, followed by notes on the energy sources and
/// on why energy is missing, so the table can be pasted without losing that context.
pub fn render_markdown(results: &[BenchResult]) -> String {
    const HEADERS: [&str; 14] = [
        "model",
        "size",
        "params",
        "backend",
        "head / KV",
        "threads",
        "test",
        "t/s",
        "J/tok",
        "W",
        "idle W",
        "J/tok above idle",
        "peak RSS",
        "GPU mem",
    ];
    // Text columns are left-aligned, numbers right-aligned (as in llama-bench).
    const RIGHT: [bool; 14] = [
        false, true, true, false, false, true, true, true, true, true, true, true, true, true,
    ];
    let rows: Vec<[String; 14]> = results
        .iter()
        .map(|r| {
            let [jt, w, iw, ja] = md_energy_cells(r);
            [
                md_escape(&r.model),
                format_size(r.model_size_bytes),
                format_params(r.params),
                md_escape(&r.backend),
                format!("{} / {}", md_escape(&r.lm_head), md_escape(&r.kv_cache)),
                r.threads.to_string(),
                md_escape(&r.test),
                r.tokens_per_s.to_string(),
                jt,
                w,
                iw,
                ja,
                fmt_opt_bytes(r.peak_rss_bytes),
                fmt_opt_bytes(r.gpu_mem_bytes),
            ]
        })
        .collect();
    let mut widths: [usize; 14] = HEADERS.map(|h| h.chars().count());
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let pad = |s: &str, w: usize, right: bool| {
        let fill = " ".repeat(w.saturating_sub(s.chars().count()));
        if right {
            format!("{fill}{s}")
        } else {
            format!("{s}{fill}")
        }
    };
    let mut out = String::new();
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    out.push_str(&line(
        (0..HEADERS.len())
            .map(|i| pad(HEADERS[i], widths[i], RIGHT[i]))
            .collect(),
    ));
    out.push_str(&line(
        (0..HEADERS.len())
            .map(|i| {
                let dashes = "-".repeat(widths[i].max(3) - usize::from(RIGHT[i]));
                if RIGHT[i] {
                    format!("{dashes}:")
                } else {
                    dashes
                }
            })
            .collect(),
    ));
    for row in &rows {
        out.push_str(&line(
            (0..HEADERS.len())
                .map(|i| pad(&row[i], widths[i], RIGHT[i]))
                .collect(),
        ));
    }

    let mut notes: Vec<String> = Vec::new();
    for r in results {
        let note = match (&r.energy, &r.energy_na_reason) {
            (Some(e), _) if e.is_estimate => {
                format!("~ energy is an estimate: {}", e.sensors.join(" + "))
            }
            (Some(e), _) => format!("energy measured by: {}", e.sensors.join(" + ")),
            (None, Some(reason)) => format!("energy n/a: {reason}"),
            (None, None) => "energy n/a: not measured".to_string(),
        };
        if !notes.contains(&note) {
            notes.push(note);
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            let _ = writeln!(out, "{}", md_escape(&n));
        }
    }
    let gpu: Vec<_> = results
        .iter()
        .filter_map(|r| r.gpu_work.map(|g| (r, g)))
        .collect();
    if !gpu.is_empty() {
        out.push_str("\nGPU host work per token:\n\n");
        out.push_str(
            "| backend | test | dispatches/tok | submits/tok | waits/tok | encode µs/tok |\n",
        );
        out.push_str(
            "| ------- | ---- | -------------: | ----------: | --------: | ------------: |\n",
        );
        for (r, g) in gpu {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {:.2} | {:.2} | {:.1} |",
                md_escape(&r.backend),
                md_escape(&r.test),
                g.dispatches_per_token,
                g.submits_per_token,
                g.waits_per_token,
                g.encode_us_per_token
            );
        }
    }
    out
}

/// A JSON array with one object per result; missing energy is `null` with `energy_na_reason`.
pub fn render_json(results: &[BenchResult]) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(results)
}

/// The CSV columns, in order.
pub const CSV_HEADER: [&str; 25] = [
    "model",
    "model_size_bytes",
    "params",
    "backend",
    "threads",
    "test",
    "n_tokens",
    "depth",
    "batch",
    "lm_head",
    "kv_cache",
    "repetitions",
    "tps_mean",
    "tps_stddev",
    "tps_min",
    "tps_max",
    "joules_per_token",
    "average_watts",
    "idle_watts",
    "joules_per_token_above_idle",
    "energy_is_estimate",
    "energy_sensors",
    "energy_na_reason",
    "peak_rss_bytes",
    "gpu_mem_bytes",
];

/// RFC 4180 quoting: only fields containing a comma, quote or line break are quoted.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CSV with a header row; numbers at full precision, missing values `n/a`.
pub fn render_csv(results: &[BenchResult]) -> String {
    let na = || NA.to_string();
    let num = |x: f64| if x.is_finite() { x.to_string() } else { na() };
    let mut out = CSV_HEADER.join(",");
    out.push('\n');
    for r in results {
        let e = r.energy.as_ref();
        let cells: Vec<String> = vec![
            r.model.clone(),
            r.model_size_bytes.to_string(),
            r.params.to_string(),
            r.backend.clone(),
            r.threads.to_string(),
            r.test.clone(),
            r.n_tokens.to_string(),
            r.depth.to_string(),
            r.batch.to_string(),
            r.lm_head.clone(),
            r.kv_cache.clone(),
            r.tokens_per_s.n.to_string(),
            num(r.tokens_per_s.mean),
            num(r.tokens_per_s.stddev),
            num(r.tokens_per_s.min),
            num(r.tokens_per_s.max),
            e.map(|e| num(e.joules_per_token)).unwrap_or_else(na),
            e.map(|e| num(e.average_watts)).unwrap_or_else(na),
            e.and_then(|e| e.idle_watts).map(num).unwrap_or_else(na),
            e.and_then(|e| e.joules_per_token_above_idle)
                .map(num)
                .unwrap_or_else(na),
            e.map(|e| e.is_estimate.to_string()).unwrap_or_else(na),
            e.map(|e| e.sensors.join("; ")).unwrap_or_else(na),
            match (e, &r.energy_na_reason) {
                (Some(_), _) => String::new(),
                (None, Some(reason)) => reason.clone(),
                (None, None) => "not measured".to_string(),
            },
            r.peak_rss_bytes.map(|b| b.to_string()).unwrap_or_else(na),
            r.gpu_mem_bytes.map(|b| b.to_string()).unwrap_or_else(na),
        ];
        let row: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}
