//! Picking the next token from logits: repeat penalty, temperature, top-k, top-p, min-p, then a
//! seeded draw (ChaCha8, so a seed gives the same text on every machine). Temperature 0 is greedy.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{BitnetError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens (1 = off), llama.cpp style.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 42,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 && self.repeat_penalty == 1.0
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(BitnetError::InvalidArgument(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("--temperature {} must be ≥ 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("--top-p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("--min-p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad(format!(
                "--repeat-penalty {} must be > 0",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct Sampler {
    pub config: SamplerConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Result<Self> {
        config.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Ok(Sampler { config, rng })
    }

    /// Picks a token from `logits [vocab]` given the ids so far (`history`). A NaN logit is
    /// never picked; logits with no number at all (all NaN: a broken model) give token 0 here and
    /// an error from [`Sampler::try_sample`].
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.try_sample(logits, history).unwrap_or(0)
    }

    /// [`Sampler::sample`], with an error when no logit is a number.
    pub fn try_sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let c = &self.config;
        let mut logits = logits.to_vec();
        if c.repeat_penalty != 1.0 {
            apply_repeat_penalty(&mut logits, history, c.repeat_last_n, c.repeat_penalty);
        }
        // NaN is never the most likely token: -inf keeps it out of the argmax and the softmax.
        for l in logits.iter_mut().filter(|l| l.is_nan()) {
            *l = f32::NEG_INFINITY;
        }
        if !logits.iter().any(|&l| l > f32::NEG_INFINITY) {
            return Err(BitnetError::op(
                "sample",
                "every logit is NaN or -inf: the model output is broken",
            ));
        }
        if c.temperature == 0.0 {
            return Ok(crate::backend::cpu::argmax(&logits) as u32);
        }
        let probs = filtered_probs(&logits, c);
        let r = self.uniform();
        Ok(draw(&probs, r))
    }

    /// The next draw of the seeded stream, uniform in [0, 1): what `try_sample` uses for one
    /// pick at a temperature above 0 (a device sampler takes the same draws).
    pub fn uniform(&mut self) -> f32 {
        self.rng.random()
    }
}

/// llama.cpp's penalty: for each distinct token of the last `last_n`, logit / p if positive,
/// × p if negative (so p > 1 always makes it less likely).
pub fn apply_repeat_penalty(logits: &mut [f32], history: &[u32], last_n: usize, penalty: f32) {
    let start = history.len().saturating_sub(last_n);
    let mut seen = std::collections::HashSet::new();
    for &id in &history[start..] {
        if let Some(l) = logits.get_mut(id as usize) {
            if seen.insert(id) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// Softmax of logits / temperature restricted by top-k, top-p and min-p: `(id, prob)` pairs,
/// sorted most likely first, probabilities renormalised to sum to 1. Every probability is
/// finite for any temperature > 0: the largest logit is subtracted before dividing by the
/// temperature, so a tiny temperature gives (logit − max) / T = 0 or −inf, i.e. greedy, instead
/// of inf / inf = NaN. Logits of +inf share the probability; NaN logits get none.
pub fn filtered_probs(logits: &[f32], c: &SamplerConfig) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, if l.is_nan() { f32::NEG_INFINITY } else { l }))
        .collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if c.top_k > 0 {
        idx.truncate(c.top_k.max(1));
    }
    let max = idx[0].1;
    let mut sum = 0.0f64;
    for e in idx.iter_mut() {
        // x − max ≤ 0 (both inf: the same logit, probability weight 1; all -inf: uniform).
        let d = if e.1 == max { 0.0 } else { e.1 - max };
        e.1 = (d / c.temperature).exp();
        sum += e.1 as f64;
    }
    for e in idx.iter_mut() {
        e.1 = (e.1 as f64 / sum) as f32;
    }
    if c.min_p > 0.0 {
        let floor = idx[0].1 * c.min_p;
        idx.retain(|e| e.1 >= floor);
    }
    if c.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = idx.len();
        for (i, e) in idx.iter().enumerate() {
            acc += e.1;
            if acc >= c.top_p {
                keep = i + 1;
                break;
            }
        }
        idx.truncate(keep);
    }
    let total: f32 = idx.iter().map(|e| e.1).sum();
    for e in idx.iter_mut() {
        e.1 /= total;
    }
    idx
}

/// Inverse-CDF draw with `r` uniform in [0, 1).
pub fn draw(probs: &[(u32, f32)], r: f32) -> u32 {
    let mut acc = 0.0;
    for &(id, p) in probs {
        acc += p;
        if r < acc {
            return id;
        }
    }
    probs.last().map(|e| e.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SamplerConfig {
        SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 1,
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[]), 1);
    }

    #[test]
    fn top_k_keeps_k_most_likely() {
        let p = filtered_probs(&[1.0, 3.0, 2.0, 0.0], &SamplerConfig { top_k: 2, ..cfg() });
        assert_eq!(p.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((p[0].1 + p[1].1 - 1.0).abs() < 1e-6);
        assert!((p[0].1 - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        // probs of ln(0.5), ln(0.3), ln(0.2): top_p 0.75 keeps two (0.5 + 0.3 ≥ 0.75).
        let l = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let p = filtered_probs(
            &l,
            &SamplerConfig {
                top_p: 0.75,
                ..cfg()
            },
        );
        assert_eq!(p.len(), 2);
        assert!((p[0].1 - 0.625).abs() < 1e-5);
        let p = filtered_probs(
            &l,
            &SamplerConfig {
                top_p: 0.5,
                ..cfg()
            },
        );
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let l = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        // floor = 0.5 × 0.5 = 0.25: keeps 0.5 and 0.3.
        let p = filtered_probs(
            &l,
            &SamplerConfig {
                min_p: 0.5,
                ..cfg()
            },
        );
        assert_eq!(p.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let l = [1.0f32, 0.0];
        let cold = filtered_probs(
            &l,
            &SamplerConfig {
                temperature: 0.5,
                ..cfg()
            },
        );
        let hot = filtered_probs(
            &l,
            &SamplerConfig {
                temperature: 2.0,
                ..cfg()
            },
        );
        assert!((cold[0].1 - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
        assert!((hot[0].1 - 1.0 / (1.0 + (-0.5f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn repeat_penalty_divides_positive_multiplies_negative_once() {
        let mut l = [2.0f32, -2.0, 1.0];
        apply_repeat_penalty(&mut l, &[0, 1, 0, 0], 64, 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0]);
        let mut l = [2.0f32, -2.0, 1.0];
        apply_repeat_penalty(&mut l, &[0, 1, 2], 1, 2.0); // only the last token counts
        assert_eq!(l, [2.0, -2.0, 0.5]);
    }

    #[test]
    fn seed_makes_sampling_reproducible_and_draw_follows_cdf() {
        let l: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..cfg() }).unwrap();
            (0..20).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let probs = [(5, 0.2), (9, 0.5), (3, 0.3)];
        assert_eq!(draw(&probs, 0.1), 5);
        assert_eq!(draw(&probs, 0.69), 9);
        assert_eq!(draw(&probs, 0.71), 3);
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(Sampler::new(SamplerConfig {
            top_p: 0.0,
            ..cfg()
        })
        .is_err());
        assert!(Sampler::new(SamplerConfig {
            temperature: -1.0,
            ..cfg()
        })
        .is_err());
        assert!(Sampler::new(SamplerConfig {
            min_p: 2.0,
            ..cfg()
        })
        .is_err());
    }
}
