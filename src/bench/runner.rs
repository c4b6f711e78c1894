//! The benchmark runner behind `bitnet bench`: llama-bench's ppN (the prompt as one batch) and
//! tgN (one token at a time) tests, optionally after `depth` tokens of context, timed after a
//! warm-up and excluding tokenization and sampling. Every timed region ends with a read-back
//! (a GPU backend must finish its work before the clock stops). A decode test of batch B
//! (`tgN xB`) decodes B sequences together, one row of each per step, as `bitnet serve`'s
//! scheduler runs them (each step's logits read back and each row's next token picked on the
//! host), which shows how a backend scales with the rows of a step without HTTP in the way.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::reference::argmax;
use crate::backend::StepRow;
use crate::energy::{EnergyMeter, EnergyReading};
use crate::engine::{build_model, AnyModel, EngineOptions};
use crate::error::{BitnetError, Result};
use crate::load::ModelWeights;
use crate::model::ModelOptions;

/// One test: prefill of `n_tokens` or decode of `n_tokens`, after `depth` tokens of context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKind {
    Prefill,
    Decode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestSpec {
    pub kind: TestKind,
    /// Tokens per sequence: the prompt (prefill) or the generated tokens (decode).
    pub n_tokens: usize,
    pub depth: usize,
    /// Sequences decoded together (1 for prefill tests).
    pub batch: usize,
}

impl TestSpec {
    /// llama-bench's names: `pp512`, `tg128`, `pp512 @ d1024`; a batched decode `tg128 x8`.
    pub fn name(&self) -> String {
        let base = match self.kind {
            TestKind::Prefill => format!("pp{}", self.n_tokens),
            TestKind::Decode if self.batch > 1 => format!("tg{} x{}", self.n_tokens, self.batch),
            TestKind::Decode => format!("tg{}", self.n_tokens),
        };
        if self.depth > 0 {
            format!("{base} @ d{}", self.depth)
        } else {
            base
        }
    }

    /// Tokens one run processes, every sequence's.
    pub fn tokens(&self) -> usize {
        self.n_tokens * self.batch
    }
}

/// Wall times of each repetition (seconds), after one warm-up run.
#[derive(Debug, Clone)]
pub struct TestTimes {
    pub spec: TestSpec,
    pub seconds: Vec<f64>,
    /// Per-token host work of the timed repetitions on the GPU backend.
    pub gpu_work: Option<crate::bench::GpuWork>,
}

impl TestTimes {
    pub fn tokens_per_s(&self) -> Vec<f64> {
        self.seconds
            .iter()
            .map(|s| self.spec.tokens() as f64 / s)
            .collect()
    }
}

/// The tests of one `bitnet bench` command line: at each context depth, prefill of each prompt
/// length, then decode of each generation length at each batch size (a length of 0 is no test;
/// batch sizes of 0 are dropped).
pub fn test_matrix(
    depths: &[usize],
    n_prompt: &[usize],
    n_gen: &[usize],
    batches: &[usize],
) -> Vec<TestSpec> {
    let mut tests = Vec::new();
    for &depth in depths {
        for &n_tokens in n_prompt.iter().filter(|&&n| n > 0) {
            tests.push(TestSpec {
                kind: TestKind::Prefill,
                n_tokens,
                depth,
                batch: 1,
            });
        }
        for &n_tokens in n_gen.iter().filter(|&&n| n > 0) {
            for &batch in batches.iter().filter(|&&b| b > 0) {
                tests.push(TestSpec {
                    kind: TestKind::Decode,
                    n_tokens,
                    depth,
                    batch,
                });
            }
        }
    }
    tests
}

/// Builds the model once for the largest context the tests need.
pub fn build_for_tests(
    weights: &ModelWeights,
    opts: &EngineOptions,
    tests: &[TestSpec],
) -> Result<AnyModel> {
    let need = tests
        .iter()
        .map(|t| t.depth + t.n_tokens)
        .max()
        .unwrap_or(1);
    let c = &weights.config;
    if need > c.max_position_embeddings {
        return Err(BitnetError::ContextOverflow {
            needed: need,
            ctx: c.max_position_embeddings,
        });
    }
    let batch = tests.iter().map(|t| t.batch).max().unwrap_or(1).max(1);
    let mut mo = ModelOptions::for_config(c);
    mo.ctx = need;
    mo.max_batch = tests
        .iter()
        .filter(|t| t.kind == TestKind::Prefill)
        .map(|t| t.n_tokens)
        .max()
        .unwrap_or(1)
        .max(512)
        .min(need)
        .max(batch);
    // a batched decode test: one KV-cache slot of `need` positions per sequence
    mo.slots = batch;
    mo.max_logit_rows = batch;
    mo.lm_head = opts.lm_head;
    mo.kv_cache = opts.kv_cache;
    build_model(weights, opts, mo)
}

/// Runs one test `reps` times after a warm-up; `on_region(start/stop)` brackets each timed run
/// (the energy meter hooks in there).
pub fn run_test(
    model: &mut AnyModel,
    spec: TestSpec,
    reps: usize,
    seed: u64,
    mut on_region: impl FnMut(bool),
) -> Result<TestTimes> {
    let vocab = model.vocab_size();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab as u32)).collect() };
    let mut seconds = Vec::with_capacity(reps);
    let counters = |m: &AnyModel| match m {
        AnyModel::Gpu(m) => Some(m.backend.counters()),
        AnyModel::Cpu(_) => None,
    };
    // (dispatches, submits, waits, encode ns) summed over the timed repetitions
    let mut work: Option<[u64; 4]> = None;
    let batched = spec.kind == TestKind::Decode && spec.batch > 1;
    for rep in 0..=reps {
        model.reset();
        if spec.depth > 0 && batched {
            // every sequence's context, each in its slot, in steps of at most max_batch rows
            let step = model.max_batch();
            for slot in 0..spec.batch as u32 {
                let context = random_tokens(spec.depth);
                for (k, chunk) in context.chunks(step).enumerate() {
                    let rows = StepRow::sequence_in(slot, chunk, k * step);
                    model.step_logits(&rows, &[chunk.len() as u32 - 1])?;
                }
            }
        } else if spec.depth > 0 {
            model.forward_argmax(&random_tokens(spec.depth))?;
        }
        let tokens = random_tokens(if batched { spec.batch } else { spec.n_tokens });
        let warmup = rep == 0;
        if !warmup {
            on_region(true);
        }
        let before = counters(model);
        let t0 = Instant::now();
        match spec.kind {
            TestKind::Prefill => {
                model.forward_argmax(&tokens)?;
            }
            TestKind::Decode if batched => {
                // `batch` sequences at positions depth.., one row each per step, each row's
                // logits read back and its greedy token picked on the host (as `serve` does)
                let logit_rows: Vec<u32> = (0..spec.batch as u32).collect();
                let mut next = tokens;
                for s in 0..spec.n_tokens {
                    let rows: Vec<StepRow> = next
                        .iter()
                        .enumerate()
                        .map(|(slot, &token)| StepRow {
                            token,
                            pos: (spec.depth + s) as u32,
                            slot: slot as u32,
                        })
                        .collect();
                    let logits = model.step_logits(&rows, &logit_rows)?; // [batch, vocab]
                    for (t, row) in next.iter_mut().zip(logits.chunks_exact(vocab)) {
                        *t = argmax(row) as u32;
                    }
                }
            }
            TestKind::Decode => {
                // Greedy decoding as `generate` runs it (on the GPU each token's step is
                // submitted before the previous token is read back): the first token is from
                // the fixed stream, the others the model's picks; what the tokens are does not
                // change the work per token.
                if let Some(first) = tokens.first() {
                    model.greedy_begin(&[*first])?;
                    for _ in 1..tokens.len() {
                        model.greedy_next()?;
                    }
                    model.greedy_finish()?;
                }
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        if !warmup {
            on_region(false);
            seconds.push(dt);
            if let (Some(b), Some(a)) = (before, counters(model)) {
                let w = work.get_or_insert([0; 4]);
                w[0] += a.dispatches - b.dispatches;
                w[1] += a.submits - b.submits;
                w[2] += a.waits - b.waits;
                w[3] += a.encode_ns - b.encode_ns;
            }
        }
    }
    let tokens = (spec.tokens() * reps).max(1) as f64;
    let gpu_work = work.map(|[d, s, w, ns]| crate::bench::GpuWork {
        dispatches_per_token: d as f64 / tokens,
        submits_per_token: s as f64 / tokens,
        waits_per_token: w as f64 / tokens,
        encode_us_per_token: ns as f64 / 1e3 / tokens,
    });
    Ok(TestTimes {
        spec,
        seconds,
        gpu_work,
    })
}

/// [`run_test`] with `meter` bracketing each timed repetition. The energy is that of the timed
/// repetitions summed (the untimed context pre-fill excluded): `None` without a meter, an error
/// message when a reading failed or none was taken.
pub fn run_metered(
    model: &mut AnyModel,
    spec: TestSpec,
    reps: usize,
    seed: u64,
    mut meter: Option<&mut EnergyMeter>,
) -> Result<(
    TestTimes,
    Option<std::result::Result<EnergyReading, String>>,
)> {
    let metered = meter.is_some();
    let mut readings: Vec<EnergyReading> = Vec::new();
    let mut energy_err: Option<String> = None;
    let mut snap = None;
    let times = run_test(model, spec, reps, seed, |start| {
        let Some(m) = meter.as_deref_mut() else {
            return;
        };
        if start {
            snap = m.start().map_err(|e| energy_err = Some(e.to_string())).ok();
        } else if let Some(s) = snap.take() {
            match m.stop(&s) {
                Ok(r) => readings.push(r),
                Err(e) => energy_err = Some(e.to_string()),
            }
        }
    })?;
    let energy = match (energy_err, sum_readings(&readings)) {
        _ if !metered => None,
        (Some(e), _) => Some(Err(format!("energy reading failed: {e}"))),
        (None, Some(total)) => Some(Ok(total)),
        (None, None) => Some(Err("no reading".to_string())),
    };
    Ok((times, energy))
}

/// The readings of several spans as one: joules (in total and per sensor) and seconds added;
/// `None` for no readings.
fn sum_readings(readings: &[EnergyReading]) -> Option<EnergyReading> {
    let (first, rest) = readings.split_first()?;
    let mut total = first.clone();
    for x in rest {
        total.total_j += x.total_j;
        total.seconds += x.seconds;
        for (acc, y) in total.joules_by_sensor.iter_mut().zip(&x.joules_by_sensor) {
            acc.2 += y.2;
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::EnergyDomain;

    #[test]
    fn the_test_matrix_is_prefill_then_decode_at_each_depth() {
        let names: Vec<String> = test_matrix(&[0, 64], &[512, 0], &[0, 16], &[1])
            .iter()
            .map(TestSpec::name)
            .collect();
        assert_eq!(names, ["pp512", "tg16", "pp512 @ d64", "tg16 @ d64"]);
        assert!(test_matrix(&[0], &[0], &[0], &[1]).is_empty());
        let batched = test_matrix(&[0, 8], &[4], &[16], &[1, 8, 0]);
        let names: Vec<String> = batched.iter().map(TestSpec::name).collect();
        assert_eq!(
            names,
            [
                "pp4",
                "tg16",
                "tg16 x8",
                "pp4 @ d8",
                "tg16 @ d8",
                "tg16 x8 @ d8"
            ]
        );
        assert_eq!(batched[2].tokens(), 128);
        assert_eq!(batched[0].tokens(), 4);
    }

    #[test]
    fn readings_add_in_total_and_per_sensor() {
        let reading = |j: f64, s: f64| EnergyReading {
            joules_by_sensor: vec![("rapl".into(), EnergyDomain::CpuPackage, j)],
            total_j: j,
            seconds: s,
            is_estimate: false,
            source: "rapl".into(),
        };
        assert_eq!(sum_readings(&[]), None);
        let total = sum_readings(&[reading(2.0, 1.0), reading(3.0, 0.5)]).unwrap();
        assert_eq!((total.total_j, total.seconds), (5.0, 1.5));
        assert_eq!(total.joules_by_sensor[0].2, 5.0);
    }
}
