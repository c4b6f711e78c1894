//! Benchmark statistics, reports and plots.
