//! The benchmark runner behind `bitnet bench`: llama-bench's ppN (the prompt as one batch) and
//! tgN (one token at a time) tests, optionally after `depth` tokens of context, timed after a
//! warm-up and excluding tokenization and sampling. Every timed region ends with a read-back
//! (a GPU backend must finish its work before the clock stops).

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
    pub n_tokens: usize,
    pub depth: usize,
}

impl TestSpec {
    /// llama-bench's names: `pp512`, `tg128`, `pp512 @ d1024`.
    pub fn name(&self) -> String {
        let base = match self.kind {
            TestKind::Prefill => format!("pp{}", self.n_tokens),
            TestKind::Decode => format!("tg{}", self.n_tokens),
        };
        if self.depth > 0 {
            format!("{base} @ d{}", self.depth)
        } else {
            base
        }
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
            .map(|s| self.spec.n_tokens as f64 / s)
            .collect()
    }
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
    let mut mo = ModelOptions::for_config(c);
    mo.ctx = need;
    mo.max_batch = tests
        .iter()
        .filter(|t| t.kind == TestKind::Prefill)
        .map(|t| t.n_tokens)
        .max()
        .unwrap_or(1)
        .max(512)
        .min(need);
    mo.max_logit_rows = 1;
    mo.lm_head = opts.lm_head;
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
    for rep in 0..=reps {
        model.reset();
        if spec.depth > 0 {
            model.forward_argmax(&random_tokens(spec.depth))?;
        }
        let tokens = random_tokens(spec.n_tokens);
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
    let tokens = (spec.n_tokens * reps).max(1) as f64;
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
