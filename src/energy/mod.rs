//! Energy sensors (RAPL, NVML, hwmon).
