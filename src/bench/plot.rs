//! Charts of throughput (and energy per token) against context depth or thread count, written
//! as SVG or PNG with plotters.
//!
//! Text needs a font engine only for bitmaps: the SVG backend writes `<text>` elements and lets
//! the viewer pick the font, but plotters' bitmap backend rasterises text itself, and with the
//! crate's current features (no `ttf`/`ab_glyph`) it has no rasteriser and would panic. PNG
//! charts are therefore drawn without title, axis labels or legend (lines, points and grid
//! only); enabling plotters' `ab_glyph` feature (plus registering a font) would lift that.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::BenchResult;

/// A labelled line: `(label, [(x, y)])`.
pub type Series = (String, Vec<(f64, f64)>);

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("unsupported plot file {0:?}: use a .svg or .png file name")]
    UnsupportedExtension(PathBuf),
    #[error("nothing to plot: no finite data point in any series")]
    NoData,
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

/// What `bitnet bench --plot` draws from its results: tokens/s and, where measured, J/token,
/// one line per test (per test and thread count when x is the depth).
#[derive(Debug, Clone, PartialEq)]
pub struct BenchSeries {
    pub x_label: &'static str,
    pub speed: Vec<Series>,
    pub joules: Vec<Series>,
}

/// Groups `results` into lines: against the context depth when several depths ran or a single
/// thread count did (`by_depth`), else against the thread count.
pub fn bench_series(results: &[BenchResult], by_depth: bool) -> BenchSeries {
    let mut speed: Vec<Series> = Vec::new();
    let mut joules: Vec<Series> = Vec::new();
    for r in results {
        let label = if by_depth {
            let kind = if r.test.starts_with("pp") { "pp" } else { "tg" };
            let batch = if r.batch > 1 {
                format!(" x{}", r.batch)
            } else {
                String::new()
            };
            format!("{kind}{}{batch} {}t", r.n_tokens, r.threads)
        } else {
            r.test.clone()
        };
        let x = if by_depth {
            r.depth as f64
        } else {
            r.threads as f64
        };
        let push = |v: &mut Vec<Series>, y: f64| match v.iter_mut().find(|s| s.0 == label) {
            Some(s) => s.1.push((x, y)),
            None => v.push((label.clone(), vec![(x, y)])),
        };
        push(&mut speed, r.tokens_per_s.mean);
        if let Some(e) = &r.energy {
            push(&mut joules, e.joules_per_token);
        }
    }
    BenchSeries {
        x_label: if by_depth {
            "context depth (tokens)"
        } else {
            "threads"
        },
        speed,
        joules,
    }
}

const WIDTH: u32 = 1024;
const PANEL_HEIGHT: u32 = 480;

/// Draws tokens/s per series against x (context depth or threads), and J/token in a second
/// panel below when `energy` has data. The format follows the extension (`.svg` or `.png`).
/// Non-finite points are dropped rather than drawn as zeros.
pub fn plot_series(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
    energy: Option<&[Series]>,
) -> Result<(), PlotError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let series = clean(series);
    if series.is_empty() {
        return Err(PlotError::NoData);
    }
    let energy = energy.map(clean).filter(|e| !e.is_empty());
    let height = PANEL_HEIGHT * if energy.is_some() { 2 } else { 1 };
    let charts = Charts {
        title,
        x_label,
        series: &series,
        energy: energy.as_deref(),
    };
    let draw_err = |message: String| PlotError::Draw {
        path: path.to_path_buf(),
        message,
    };
    match ext.as_deref() {
        Some("svg") => {
            let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
            charts
                .draw(&root, true)
                .map_err(|e| draw_err(e.to_string()))?;
            root.present().map_err(|e| draw_err(e.to_string()))
        }
        Some("png") => {
            let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
            charts
                .draw(&root, false)
                .map_err(|e| draw_err(e.to_string()))?;
            root.present().map_err(|e| draw_err(e.to_string()))
        }
        _ => Err(PlotError::UnsupportedExtension(path.to_path_buf())),
    }
}

/// Keeps finite points, sorted by x so lines do not zigzag; drops series left empty.
fn clean(series: &[Series]) -> Vec<Series> {
    series
        .iter()
        .filter_map(|(label, pts)| {
            let mut pts: Vec<(f64, f64)> = pts
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (!pts.is_empty()).then(|| (label.clone(), pts))
        })
        .collect()
}

/// Axis range with a little headroom, never empty (plotters needs start < end).
fn range(values: impl Iterator<Item = f64> + Clone, from_zero: bool) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let (lo, hi) = if from_zero {
        (lo.min(0.0), hi.max(0.0))
    } else {
        (lo, hi)
    };
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        (lo - 1.0, hi + 1.0)
    } else if from_zero {
        let pad = (hi - lo) * 0.1;
        (if lo < 0.0 { lo - pad } else { lo }, hi + pad)
    } else {
        let pad = (hi - lo) * 0.03;
        (lo - pad, hi + pad)
    }
}

/// Axis tick text without float noise: depths and thread counts print as `1024`, not `1024.0`.
fn tick(v: &f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

struct Charts<'a> {
    title: &'a str,
    x_label: &'a str,
    series: &'a [Series],
    energy: Option<&'a [Series]>,
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

impl Charts<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        text: bool,
    ) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let area = if text {
            root.titled(self.title, ("sans-serif", 24))?
        } else {
            root.clone()
        };
        // One colour per label across both panels, so "cpu 8 threads" is the same colour in
        // the throughput and the energy chart even when the energy panel lacks some series.
        let mut labels: Vec<&str> = Vec::new();
        for (l, _) in self.series.iter().chain(self.energy.unwrap_or(&[])) {
            if !labels.contains(&l.as_str()) {
                labels.push(l);
            }
        }
        let color_of = |label: &str| {
            let i = labels.iter().position(|l| *l == label).unwrap_or(0);
            Palette99::pick(i).to_rgba()
        };
        match self.energy {
            Some(energy) => {
                let panels = area.split_evenly((2, 1));
                panel(
                    &panels[0],
                    self.x_label,
                    "tokens/s",
                    self.series,
                    &color_of,
                    text,
                )?;
                panel(&panels[1], self.x_label, "J/token", energy, &color_of, text)?;
            }
            None => panel(
                &area,
                self.x_label,
                "tokens/s",
                self.series,
                &color_of,
                text,
            )?,
        }
        Ok(())
    }
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    color_of: &dyn Fn(&str) -> RGBAColor,
    text: bool,
) -> DrawResult<DB> {
    let points = || series.iter().flat_map(|(_, p)| p.iter());
    let (x0, x1) = range(points().map(|p| p.0), false);
    let (y0, y1) = range(points().map(|p| p.1), true);

    let mut builder = ChartBuilder::on(area);
    builder.margin(16);
    if text {
        builder.x_label_area_size(48).y_label_area_size(72);
    }
    let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&tick)
            .y_label_formatter(&tick);
    }
    mesh.draw()?;

    for (label, pts) in series {
        let color = color_of(label);
        let line =
            chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
        if text {
            line.label(label.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Summary;

    fn result(test: &str, n_tokens: usize, depth: usize, threads: usize, tps: f64) -> BenchResult {
        BenchResult {
            model: "m".into(),
            gpu_work: None,
            model_size_bytes: 0,
            params: 0,
            backend: "cpu".into(),
            threads,
            test: test.into(),
            n_tokens,
            depth,
            batch: 1,
            lm_head: "exact".into(),
            kv_cache: "f32".into(),
            tokens_per_s: Summary::from_slice(&[tps]).unwrap(),
            energy: None,
            energy_na_reason: Some("none".into()),
            peak_rss_bytes: None,
            gpu_mem_bytes: None,
        }
    }

    #[test]
    fn bench_series_groups_by_depth_or_by_threads() {
        let results = [
            result("pp64", 64, 0, 1, 10.0),
            result("pp64 @ d128", 64, 128, 1, 8.0),
            result("tg16", 16, 0, 1, 2.0),
        ];
        let by_depth = bench_series(&results, true);
        assert_eq!(by_depth.x_label, "context depth (tokens)");
        assert_eq!(
            by_depth.speed,
            vec![
                ("pp64 1t".to_string(), vec![(0.0, 10.0), (128.0, 8.0)]),
                ("tg16 1t".to_string(), vec![(0.0, 2.0)]),
            ]
        );
        assert!(by_depth.joules.is_empty());
        let results = [result("tg16", 16, 0, 1, 2.0), result("tg16", 16, 0, 2, 3.5)];
        let by_threads = bench_series(&results, false);
        assert_eq!(by_threads.x_label, "threads");
        assert_eq!(
            by_threads.speed,
            vec![("tg16".to_string(), vec![(1.0, 2.0), (2.0, 3.5)])]
        );
    }
}
