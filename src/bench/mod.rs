//! `bitnet bench`: the runner that times the model (`runner.rs`), and the statistics, reports
//! and plots that turn its numbers into summaries, tables and charts (`stats.rs`, `report.rs`,
//! `plot.rs`: tested without a model). The CLI only parses its flags and calls these.

pub mod plot;
pub mod report;
pub mod runner;
pub mod stats;

pub use plot::{bench_series, plot_series, BenchSeries, PlotError, Series};
pub use report::{
    csv_field, format_params, format_sig3, format_size, render, render_csv, render_json,
    render_markdown, BenchResult, EnergyResult, GpuWork, OutputFormat, ParseOutputFormatError,
    ReportError, CSV_HEADER,
};
pub use runner::{
    build_for_tests, run_metered, run_test, test_matrix, TestKind, TestSpec, TestTimes,
};
pub use stats::Summary;

/// Longest list `parse_int_list` expands to: a typo such as `1-1000000` should be an error, not
/// a benchmark that never ends.
pub const MAX_LIST_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseListError {
    #[error("empty list")]
    Empty,
    #[error("{0:?} is not a non-negative integer or a range like 16-512*2 / 0-4096+1024")]
    Invalid(String),
    #[error("{0:?} expands to more than {MAX_LIST_LEN} values")]
    TooLong(String),
}

/// Parses llama-bench style value lists for `-p`, `-n`, `-t`, `--depth`: comma-separated values
/// and ranges, `first-last` (step 1), `first-last+step` and `first-last*factor`, so the same
/// command lines work with both tools. `"0,1024,4096"` → `[0, 1024, 4096]`,
/// `"1-8*2"` → `[1, 2, 4, 8]`.
pub fn parse_int_list(s: &str) -> Result<Vec<usize>, ParseListError> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim) {
        if item.is_empty() {
            if s.trim().is_empty() {
                return Err(ParseListError::Empty);
            }
            return Err(ParseListError::Invalid(s.to_string()));
        }
        let invalid = || ParseListError::Invalid(item.to_string());
        let num = |t: &str| t.trim().parse::<usize>().map_err(|_| invalid());
        match item.split_once('-') {
            None => out.push(num(item)?),
            Some((first, rest)) => {
                let first = num(first)?;
                let (last, step): (usize, Box<dyn Fn(usize) -> Option<usize>>) =
                    if let Some((last, st)) = rest.split_once('+') {
                        let st = num(st)?;
                        if st == 0 {
                            return Err(invalid());
                        }
                        (num(last)?, Box::new(move |v: usize| v.checked_add(st)))
                    } else if let Some((last, m)) = rest.split_once('*') {
                        let m = num(m)?;
                        if m < 2 || first == 0 {
                            return Err(invalid());
                        }
                        (num(last)?, Box::new(move |v: usize| v.checked_mul(m)))
                    } else {
                        (num(rest)?, Box::new(|v: usize| v.checked_add(1)))
                    };
                if last < first {
                    return Err(invalid());
                }
                let mut v = first;
                loop {
                    out.push(v);
                    if out.len() > MAX_LIST_LEN {
                        return Err(ParseListError::TooLong(s.to_string()));
                    }
                    match step(v) {
                        Some(n) if n <= last => v = n,
                        _ => break,
                    }
                }
            }
        }
        if out.len() > MAX_LIST_LEN {
            return Err(ParseListError::TooLong(s.to_string()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges() {
        assert_eq!(parse_int_list("0,1024,4096").unwrap(), vec![0, 1024, 4096]);
        assert_eq!(parse_int_list(" 512 ").unwrap(), vec![512]);
        assert_eq!(parse_int_list("1-8*2").unwrap(), vec![1, 2, 4, 8]);
        assert_eq!(
            parse_int_list("0-4096+1024").unwrap(),
            vec![0, 1024, 2048, 3072, 4096]
        );
        assert_eq!(parse_int_list("1-3,16").unwrap(), vec![1, 2, 3, 16]);
        assert_eq!(parse_int_list(""), Err(ParseListError::Empty));
        assert!(parse_int_list("1,,2").is_err());
        assert!(parse_int_list("abc").is_err());
        assert!(parse_int_list("-5").is_err());
        assert!(parse_int_list("8-1").is_err());
        assert!(parse_int_list("0-8*2").is_err());
        assert!(parse_int_list("1-8+0").is_err());
        assert!(matches!(
            parse_int_list("0-100000000"),
            Err(ParseListError::TooLong(_))
        ));
    }
}
