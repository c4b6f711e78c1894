//! Perplexity of a text, with the sliding-window evaluation of Hugging Face's perplexity guide
//! (and llama-perplexity's idea of scoring each token once): windows of `ctx` tokens start every
//! `stride` tokens; each window scores only the tokens the previous windows did not, each with
//! the context the window gives it.

use serde::Serialize;

use crate::engine::Engine;
use crate::error::{BitnetError, Result};

#[derive(Debug, Clone, Serialize)]
pub struct PerplexityResult {
    pub ppl: f64,
    pub nll_per_token: f64,
    pub n_scored: usize,
    pub n_tokens: usize,
    pub n_windows: usize,
    pub ctx: usize,
    pub stride: usize,
}

/// `-log softmax(logits)[target]`, computed in f64 for a stable sum over thousands of tokens.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + logits
        .iter()
        .map(|&l| (l as f64 - m).exp())
        .sum::<f64>()
        .ln();
    lse - logits[target as usize] as f64
}

/// Windows `[begin, end)` and the first index in each window that is scored.
pub fn windows(n: usize, ctx: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + ctx).min(n);
        let trg_len = end - prev_end;
        let len = end - begin;
        out.push((begin, end, len.saturating_sub(trg_len).max(1)));
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

/// Perplexity of `ids` (encoded without special tokens) under the engine's model.
/// `on_window(done, total)` reports progress.
pub fn perplexity(
    engine: &mut Engine,
    ids: &[u32],
    ctx: usize,
    stride: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<PerplexityResult> {
    if ids.len() < 2 {
        return Err(BitnetError::EmptyInput(
            "perplexity needs a text of at least 2 tokens",
        ));
    }
    if ctx < 2 || stride == 0 || stride > ctx {
        return Err(BitnetError::InvalidArgument(format!(
            "need ctx ≥ 2 and 1 ≤ stride ≤ ctx (ctx {ctx}, stride {stride})"
        )));
    }
    let vocab = engine.config.vocab_size;
    let wins = windows(ids.len(), ctx, stride);
    let (mut total, mut n_scored) = (0.0f64, 0usize);
    for (w, &(begin, end, first)) in wins.iter().enumerate() {
        on_window(w, wins.len());
        let window = &ids[begin..end];
        let logits = engine.logits(window)?; // [len, vocab]
        for j in first..window.len() {
            total += nll(&logits[(j - 1) * vocab..j * vocab], window[j]);
            n_scored += 1;
        }
    }
    on_window(wins.len(), wins.len());
    let nll_per_token = total / n_scored as f64;
    Ok(PerplexityResult {
        ppl: nll_per_token.exp(),
        nll_per_token,
        n_scored,
        n_tokens: ids.len(),
        n_windows: wins.len(),
        ctx,
        stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_score_every_token_once() {
        // 10 tokens, ctx 4, stride 2: as the HF loop, every position 1..10 scored exactly once.
        let w = windows(10, 4, 2);
        assert_eq!(w, vec![(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]);
        let scored: usize = w.iter().map(|&(b, e, f)| e - b - f).sum();
        assert_eq!(scored, 9);
        // stride == ctx: disjoint windows, the first token of each window is not scored.
        assert_eq!(windows(10, 4, 4), vec![(0, 4, 1), (4, 8, 1), (8, 10, 1)]);
    }

    #[test]
    fn nll_is_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        assert!((nll(&l, 0) - (z.ln() - 1.0)).abs() < 1e-12);
    }
}
