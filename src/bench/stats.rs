//! Summary statistics over benchmark repetitions, matching llama-bench's conventions (mean ±
//! sample standard deviation) so numbers can be compared side by side.

use std::fmt;

/// Mean, sample standard deviation and range of a set of repetitions.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (divides by n-1, as llama-bench does): with a handful of
    /// repetitions the population formula would understate the spread. 0 when n = 1.
    pub stddev: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for an empty slice: there is no honest mean of nothing.
    pub fn from_slice(values: &[f64]) -> Option<Summary> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let stddev = if n > 1 {
            let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
            (ss / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Summary {
            n,
            mean,
            stddev,
            min,
            max,
        })
    }
}

impl fmt::Display for Summary {
    /// llama-bench's `123.45 ± 1.23`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} ± {:.2}", self.mean, self.stddev)
    }
}
