//! `bitnet bench-serve`: a load generator for any OpenAI-compatible server. C clients each send
//! R streaming completions of exactly M tokens (`ignore_eos`, greedy) back to back; the result is
//! the aggregate generated tokens/s over the level's wall time, time to first token and the gaps
//! between tokens (p50/p99, from SSE chunk arrival times), and how many requests did not end
//! with M tokens and `[DONE]` (dropped).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{BitnetError, Result};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Concurrency levels to run, one after the other.
    pub clients: Vec<usize>,
    /// Requests per client per level.
    pub requests: usize,
    /// Tokens per request.
    pub max_tokens: usize,
    pub prompt: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    pub clients: usize,
    pub requests: usize,
    pub dropped: usize,
    pub tokens: usize,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
}

/// One request's timings.
struct Trace {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    tokens: usize,
    done: bool,
}

async fn one_request(client: &reqwest::Client, o: &BenchOptions) -> Result<Trace> {
    let body = serde_json::json!({
        "prompt": o.prompt,
        "max_tokens": o.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut req = client
        .post(format!("{}/v1/completions", o.url.trim_end_matches('/')))
        .json(&body);
    if let Some(k) = &o.api_key {
        req = req.bearer_auth(k);
    }
    let t0 = Instant::now();
    let err = |e: reqwest::Error| BitnetError::Serve(format!("bench request: {e}"));
    let mut resp = req.send().await.map_err(err)?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(BitnetError::Serve(format!(
            "bench request: {status}: {text}"
        )));
    }
    let mut trace = Trace {
        ttft: None,
        gaps: Vec::new(),
        tokens: 0,
        done: false,
    };
    let mut last = t0;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(bytes) = resp.chunk().await.map_err(err)? {
        let now = Instant::now();
        buf.extend_from_slice(&bytes);
        // complete SSE events end with a blank line
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    trace.done = true;
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data)
                    .map_err(|e| BitnetError::Serve(format!("bench: bad chunk {data:?}: {e}")))?;
                let token_chunk = v["choices"]
                    .get(0)
                    .is_some_and(|c| c["finish_reason"].is_null());
                if token_chunk {
                    trace.tokens += 1;
                    match trace.ttft {
                        None => trace.ttft = Some(now - t0),
                        Some(_) => trace.gaps.push(now - last),
                    }
                    last = now;
                }
            }
        }
    }
    Ok(trace)
}

fn percentile_ms(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    // nearest rank
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1].as_secs_f64() * 1e3
}

/// Runs one concurrency level.
pub async fn run_level(o: &BenchOptions, clients: usize) -> Result<LevelResult> {
    let client = reqwest::Client::builder()
        .timeout(o.timeout)
        .build()
        .map_err(|e| BitnetError::Serve(format!("bench client: {e}")))?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, o) = (client.clone(), o.clone());
        tasks.push(tokio::spawn(async move {
            let mut traces = Vec::new();
            for _ in 0..o.requests {
                traces.push(one_request(&client, &o).await);
            }
            traces
        }));
    }
    let mut traces = Vec::new();
    for t in tasks {
        traces.extend(
            t.await
                .map_err(|e| BitnetError::Serve(format!("bench task: {e}")))?,
        );
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let (mut ttft, mut gaps) = (Vec::new(), Vec::new());
    let (mut tokens, mut dropped) = (0, 0);
    for t in &traces {
        match t {
            Ok(t) => {
                tokens += t.tokens;
                if !t.done || t.tokens != o.max_tokens {
                    dropped += 1;
                }
                ttft.extend(t.ttft);
                gaps.extend(&t.gaps);
            }
            Err(e) => {
                eprintln!("bench-serve: {e}");
                dropped += 1;
            }
        }
    }
    Ok(LevelResult {
        clients,
        requests: traces.len(),
        dropped,
        tokens,
        wall_s,
        tokens_per_s: tokens as f64 / wall_s,
        ttft_p50_ms: percentile_ms(&mut ttft, 50.0),
        ttft_p99_ms: percentile_ms(&mut ttft, 99.0),
        itl_p50_ms: percentile_ms(&mut gaps, 50.0),
        itl_p99_ms: percentile_ms(&mut gaps, 99.0),
    })
}

/// Every level, in order (on its own runtime).
pub fn run(o: &BenchOptions) -> Result<Vec<LevelResult>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| BitnetError::Serve(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        let mut out = Vec::new();
        for &c in &o.clients {
            out.push(run_level(o, c).await?);
        }
        Ok(out)
    })
}

/// A Markdown table of the levels.
pub fn markdown(results: &[LevelResult]) -> String {
    let mut s = String::from(
        "| clients | requests | dropped | tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} | {:.1} |\n",
            r.clients,
            r.requests,
            r.dropped,
            r.tokens,
            r.wall_s,
            r.tokens_per_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.itl_p50_ms,
            r.itl_p99_ms
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&mut v, 50.0), 50.0);
        assert_eq!(percentile_ms(&mut v, 99.0), 99.0);
        let mut one = vec![Duration::from_millis(7)];
        assert_eq!(percentile_ms(&mut one, 99.0), 7.0);
        assert!(percentile_ms(&mut [], 50.0).is_nan());
    }
}
