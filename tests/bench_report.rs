//! Bench statistics, the md/JSON/CSV reports (with and without energy) and plot files.

use bitnet_wgpu::bench::{
    plot_series, render, render_csv, render_json, render_markdown, BenchResult, EnergyResult,
    OutputFormat, PlotError, Summary, CSV_HEADER,
};
use bitnet_wgpu::energy::{EnergyDomain, EnergyReading, IdleBaseline};

const NO_RAPL: &str = "no RAPL in this machine: /sys/class/powercap not present (VM?)";

fn base(model: &str, test: &str) -> BenchResult {
    BenchResult {
        model: model.to_string(),
        model_size_bytes: 1_181_116_007, // 1.10 GiB
        params: 2_412_820_480,
        backend: "cpu".to_string(),
        threads: 8,
        test: test.to_string(),
        n_tokens: 128,
        depth: 0,
        batch: 1,
        lm_head: "exact".into(),
        kv_cache: "f32".into(),
        tokens_per_s: Summary::from_slice(&[30.0, 32.0, 34.0]).unwrap(),
        energy: None,
        energy_na_reason: None,
        peak_rss_bytes: Some(1_610_612_736), // 1.50 GiB
        gpu_mem_bytes: None,
        gpu_work: None,
    }
}

fn measured_energy() -> EnergyResult {
    let reading = EnergyReading {
        joules_by_sensor: vec![
            ("RAPL package-0".into(), EnergyDomain::CpuPackage, 100.0),
            ("RAPL dram".into(), EnergyDomain::Dram, 20.0),
        ],
        total_j: 120.0,
        seconds: 12.0,
        is_estimate: false,
        source: "RAPL package-0 + RAPL dram".into(),
    };
    let idle = IdleBaseline {
        watts: 4.0,
        seconds: 5.0,
        is_estimate: false,
    };
    EnergyResult::from_reading(&reading, 400, Some(&idle)).unwrap()
}

fn with_energy() -> BenchResult {
    let mut r = base("bitnet-b1.58-2B-4T", "tg128");
    r.set_energy(Ok(measured_energy()));
    r
}

fn without_energy() -> BenchResult {
    let mut r = base("bitnet-b1.58-2B-4T", "pp512 @ d1024");
    r.n_tokens = 512;
    r.depth = 1024;
    r.set_energy(Err(NO_RAPL.to_string()));
    r
}

fn estimated() -> BenchResult {
    let mut r = base("tiny", "pp512");
    let reading = EnergyReading {
        joules_by_sensor: vec![(
            "declared wall power 35 W (estimate)".into(),
            EnergyDomain::Other,
            70.0,
        )],
        total_j: 70.0,
        seconds: 2.0,
        is_estimate: true,
        source: "declared wall power 35 W (estimate)".into(),
    };
    r.set_energy(Ok(EnergyResult::from_reading(&reading, 1000, None).unwrap()));
    r
}

fn md_cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split(" | ").map(|c| c.trim().to_string()).collect()
}

#[test]
fn summary_on_known_data() {
    let s = Summary::from_slice(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
    assert_eq!(s.n, 8);
    assert_eq!(s.mean, 5.0);
    assert!(
        (s.stddev - (32.0f64 / 7.0).sqrt()).abs() < 1e-12,
        "{}",
        s.stddev
    );
    assert_eq!((s.min, s.max), (2.0, 9.0));
    assert_eq!(s.to_string(), "5.00 ± 2.14");

    let one = Summary::from_slice(&[42.5]).unwrap();
    assert_eq!(
        (one.n, one.mean, one.stddev, one.min, one.max),
        (1, 42.5, 0.0, 42.5, 42.5)
    );
    assert_eq!(Summary::from_slice(&[]), None);
}

#[test]
fn energy_result_numbers() {
    let e = measured_energy();
    assert!((e.joules_per_token - 0.3).abs() < 1e-12);
    assert!((e.average_watts - 10.0).abs() < 1e-12);
    assert_eq!(e.idle_watts, Some(4.0));
    // (120 J − 4 W × 12 s) / 400 tokens
    assert!((e.joules_per_token_above_idle.unwrap() - 0.18).abs() < 1e-12);
    assert_eq!(e.sensors, vec!["RAPL package-0", "RAPL dram"]);
    assert!(!e.is_estimate);

    let reading = EnergyReading {
        joules_by_sensor: vec![],
        total_j: 1.0,
        seconds: 1.0,
        is_estimate: false,
        source: String::new(),
    };
    assert_eq!(EnergyResult::from_reading(&reading, 0, None), None);
}

#[test]
fn markdown_with_and_without_energy() {
    let md = render_markdown(&[with_energy(), without_energy(), estimated()]);
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(
        md_cells(lines[0]),
        vec![
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
            "GPU mem"
        ]
    );
    // Alignment row: model left, size right-aligned.
    let align = md_cells(lines[1]);
    assert!(
        !align[0].ends_with(':') && align[1].ends_with(':'),
        "{align:?}"
    );
    assert_eq!(
        md_cells(lines[2]),
        vec![
            "bitnet-b1.58-2B-4T",
            "1.10 GiB",
            "2.41 B",
            "cpu",
            "exact / f32",
            "8",
            "tg128",
            "32.00 ± 2.00",
            "0.300",
            "10.0",
            "4.0",
            "0.180",
            "1.50 GiB",
            "n/a"
        ]
    );
    let row = md_cells(lines[3]);
    assert_eq!(row[6], "pp512 @ d1024");
    assert_eq!(&row[8..12], &["n/a", "n/a", "n/a", "n/a"]);
    let row = md_cells(lines[4]);
    assert_eq!(&row[8..12], &["~0.0700", "~35.0", "n/a", "n/a"]);
    // All table lines have the same display width (padded like llama-bench).
    let w = lines[0].chars().count();
    assert!(lines[..5].iter().all(|l| l.chars().count() == w), "{md}");
    assert_eq!(lines[5], "");
    assert_eq!(lines[6], "energy measured by: RAPL package-0 + RAPL dram");
    assert_eq!(lines[7], format!("energy n/a: {NO_RAPL}"));
    assert_eq!(
        lines[8],
        "~ energy is an estimate: declared wall power 35 W (estimate)"
    );
    assert_eq!(lines.len(), 9);
}

#[test]
fn markdown_small_model_units_and_escaping() {
    let mut r = base("a|b", "tg128");
    r.model_size_bytes = 50 * 1024 * 1024;
    r.params = 125_000_000;
    r.set_energy(Err("x".into()));
    let md = render_markdown(&[r]);
    let row = md.lines().nth(2).unwrap();
    assert!(row.contains("a\\|b"), "{row}");
    assert!(
        row.contains("50.00 MiB") && row.contains("125.00 M"),
        "{row}"
    );
}

#[test]
fn json_has_null_energy_and_reason() {
    let json = render_json(&[with_energy(), without_energy()]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    let a = &arr[0];
    assert_eq!(a["model"], "bitnet-b1.58-2B-4T");
    assert_eq!(a["model_size_bytes"], 1_181_116_007u64);
    assert_eq!(a["params"], 2_412_820_480u64);
    assert_eq!(a["test"], "tg128");
    assert_eq!(a["tokens_per_s"]["mean"], 32.0);
    assert_eq!(a["tokens_per_s"]["stddev"], 2.0);
    assert_eq!(a["tokens_per_s"]["n"], 3);
    assert_eq!(a["energy"]["joules_per_token"], 0.3);
    assert_eq!(a["energy"]["average_watts"], 10.0);
    assert_eq!(a["energy"]["is_estimate"], false);
    assert_eq!(a["energy"]["sensors"][1], "RAPL dram");
    assert!(a["energy_na_reason"].is_null());
    assert!(a["gpu_mem_bytes"].is_null());

    let b = &arr[1];
    assert!(b["energy"].is_null());
    assert_eq!(b["energy_na_reason"], NO_RAPL);
    assert_eq!(b["depth"], 1024);
    assert_eq!(b["test"], "pp512 @ d1024");
}

/// Minimal RFC 4180 reader, to prove the output is parseable.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                _ => field.push(c),
            }
        } else {
            match c {
                '"' => quoted = true,
                ',' => row.push(std::mem::take(&mut field)),
                '\n' => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                _ => field.push(c),
            }
        }
    }
    assert!(!quoted, "unterminated quote");
    assert!(field.is_empty() && row.is_empty(), "missing final newline");
    rows
}

#[test]
fn csv_is_parseable_with_na_and_quoting() {
    let mut odd = with_energy();
    odd.model = "my \"tiny\", model".into();
    odd.backend = "wgpu Vulkan NVIDIA H100".into();
    (odd.lm_head, odd.kv_cache) = ("q8".into(), "f16".into());
    let csv = render_csv(&[odd, without_energy()]);
    let rows = parse_csv(&csv);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0], CSV_HEADER.to_vec());
    assert!(rows.iter().all(|r| r.len() == CSV_HEADER.len()));
    let col = |name: &str| CSV_HEADER.iter().position(|h| *h == name).unwrap();

    let a = &rows[1];
    assert_eq!(a[col("model")], "my \"tiny\", model");
    assert_eq!(a[col("backend")], "wgpu Vulkan NVIDIA H100");
    assert_eq!(a[col("test")], "tg128");
    assert_eq!(
        (a[col("lm_head")].as_str(), a[col("kv_cache")].as_str()),
        ("q8", "f16")
    );
    assert_eq!(a[col("repetitions")], "3");
    assert_eq!(a[col("tps_mean")], "32");
    assert_eq!(a[col("tps_stddev")], "2");
    assert_eq!(a[col("joules_per_token")], "0.3");
    assert_eq!(a[col("average_watts")], "10");
    assert_eq!(a[col("idle_watts")], "4");
    assert_eq!(a[col("energy_is_estimate")], "false");
    assert_eq!(a[col("energy_sensors")], "RAPL package-0; RAPL dram");
    assert_eq!(a[col("energy_na_reason")], "");
    assert_eq!(a[col("peak_rss_bytes")], "1610612736");
    assert_eq!(a[col("gpu_mem_bytes")], "n/a");

    let b = &rows[2];
    assert_eq!(b[col("test")], "pp512 @ d1024");
    assert_eq!(b[col("depth")], "1024");
    for c in [
        "joules_per_token",
        "average_watts",
        "idle_watts",
        "joules_per_token_above_idle",
        "energy_is_estimate",
        "energy_sensors",
    ] {
        assert_eq!(b[col(c)], "n/a", "{c}");
    }
    assert_eq!(b[col("energy_na_reason")], NO_RAPL);
    // The reason contains no comma here but the quoting path is exercised by the model name.
    assert!(csv.contains("\"my \"\"tiny\"\", model\""));
}

#[test]
fn output_format_parsing_and_render_dispatch() {
    assert_eq!("md".parse::<OutputFormat>().unwrap(), OutputFormat::Md);
    assert_eq!(
        "Markdown".parse::<OutputFormat>().unwrap(),
        OutputFormat::Md
    );
    assert_eq!("JSON".parse::<OutputFormat>().unwrap(), OutputFormat::Json);
    assert_eq!("csv".parse::<OutputFormat>().unwrap(), OutputFormat::Csv);
    let err = "xml".parse::<OutputFormat>().unwrap_err();
    assert!(err.to_string().contains("xml"));
    assert_eq!(OutputFormat::Csv.to_string(), "csv");

    let rs = [with_energy()];
    assert_eq!(render(OutputFormat::Md, &rs).unwrap(), render_markdown(&rs));
    assert_eq!(render(OutputFormat::Csv, &rs).unwrap(), render_csv(&rs));
    assert_eq!(
        render(OutputFormat::Json, &rs).unwrap(),
        render_json(&rs).unwrap()
    );
}

fn series() -> Vec<(String, Vec<(f64, f64)>)> {
    vec![
        (
            "cpu 8 threads".to_string(),
            vec![(0.0, 40.0), (1024.0, 35.5), (4096.0, 28.0)],
        ),
        (
            "wgpu Vulkan".to_string(),
            vec![(0.0, 120.0), (1024.0, 110.0), (4096.0, f64::NAN)],
        ),
    ]
}

#[test]
fn plot_svg_with_energy_panel() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tg.svg");
    let energy = vec![("cpu 8 threads".to_string(), vec![(0.0, 0.9), (1024.0, 1.1)])];
    plot_series(
        &path,
        "tg128 vs depth",
        "context depth",
        &series(),
        Some(&energy),
    )
    .unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.contains("cpu 8 threads"));
    assert!(svg.contains("wgpu Vulkan"));
    assert!(svg.contains("tg128 vs depth"));
    assert!(svg.contains("J/token"));
    assert!(svg.contains("context depth"));
    assert!(svg.contains("<polyline") || svg.contains("<path"));
    assert!(svg.contains("height=\"960\""), "two panels");
    // Integer axes print as integers.
    assert!(svg.contains("\n1000\n") && !svg.contains("\n1000.0\n"));
}

#[test]
fn plot_png_and_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("threads.PNG");
    plot_series(&png, "tg128 vs threads", "threads", &series(), None).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() > 1000, "{} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    let pdf = tmp.path().join("x.pdf");
    assert!(matches!(
        plot_series(&pdf, "t", "x", &series(), None),
        Err(PlotError::UnsupportedExtension(_))
    ));
    assert!(!pdf.exists());
    let nan = vec![("only nan".to_string(), vec![(1.0, f64::NAN)])];
    assert!(matches!(
        plot_series(&tmp.path().join("n.svg"), "t", "x", &nan, None),
        Err(PlotError::NoData)
    ));
    // A single point (zero-width ranges) still draws.
    let one = vec![("one".to_string(), vec![(4.0, 10.0)])];
    plot_series(&tmp.path().join("one.svg"), "t", "x", &one, None).unwrap();
    // A directory that does not exist is an error, not a panic.
    let missing = tmp.path().join("no/such/dir/p.svg");
    assert!(plot_series(&missing, "t", "x", &series(), None).is_err());
}

/// GPU host work per token (counted by the wgpu backend) gets its own table under the main one
/// and fields in JSON; CPU results leave both out (`null` in JSON).
#[test]
fn gpu_host_work_is_reported_in_markdown_and_json() {
    let cpu = base("m", "tg128");
    let mut gpu = base("m", "tg128");
    gpu.backend = "wgpu Vulkan llvmpipe".into();
    gpu.gpu_work = Some(bitnet_wgpu::bench::GpuWork {
        dispatches_per_token: 493.0,
        submits_per_token: 1.0,
        waits_per_token: 0.5,
        encode_us_per_token: 612.34,
    });
    let md = render_markdown(std::slice::from_ref(&cpu));
    assert!(!md.contains("dispatches/tok"), "{md}");
    let md = render_markdown(&[cpu.clone(), gpu.clone()]);
    assert!(
        md.contains("| wgpu Vulkan llvmpipe | tg128 | 493.0 | 1.00 | 0.50 | 612.3 |"),
        "{md}"
    );
    let json: serde_json::Value = serde_json::from_str(&render_json(&[cpu, gpu]).unwrap()).unwrap();
    assert!(json[0]["gpu_work"].is_null());
    assert_eq!(json[1]["gpu_work"]["dispatches_per_token"], 493.0);
    assert_eq!(json[1]["gpu_work"]["submits_per_token"], 1.0);
    assert_eq!(json[1]["gpu_work"]["encode_us_per_token"], 612.34);
}
