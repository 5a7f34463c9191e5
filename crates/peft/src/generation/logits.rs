//! Logits processors and the token choice, with transformers' semantics: the repetition penalty,
//! then temperature, top-k and top-p (the order `generate` applies them in), then greedy argmax
//! or a draw from the softmax. They work on one row of scores at a time, on the CPU: a row is a
//! vocabulary's worth of floats, and exact agreement with transformers matters more than speed.

use rand::rngs::StdRng;
use rand::Rng;

/// How the next token is chosen from the last position's logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Draw from the distribution instead of taking the most likely token.
    pub do_sample: bool,
    /// Divides the scores; must be > 0. 1.0 leaves them as they are.
    pub temperature: f32,
    /// Keep only the `k` highest scores (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probabilities sum to at least `p` (1.0: off).
    pub top_p: f32,
    /// > 1 discourages tokens already in the sequence (CTRL's penalty); 1.0: off.
    pub repetition_penalty: f32,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }
}

/// Scores of previously seen tokens: negative ones multiplied by `penalty`, positive ones divided
/// (transformers' `RepetitionPenaltyLogitsProcessor`). Each distinct token is penalised once.
pub fn repetition_penalty(scores: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        let i = t as usize;
        if i < scores.len() && done.insert(i) {
            let s = scores[i];
            scores[i] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// `scores / temperature` (`TemperatureLogitsWarper`).
pub fn temperature(scores: &mut [f32], t: f32) {
    if t != 1.0 {
        for s in scores.iter_mut() {
            *s /= t;
        }
    }
}

/// Sets every score below the `k`-th highest to -inf (`TopKLogitsWarper`; ties with the `k`-th
/// score are kept). At least `min_keep` tokens survive.
pub fn top_k(scores: &mut [f32], k: usize, min_keep: usize) {
    let k = k.max(min_keep).min(scores.len());
    if k == 0 || k == scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// Nucleus filtering (`TopPLogitsWarper`): sort ascending, and drop the tokens whose cumulative
/// probability from the bottom stays `<= 1 - p`, keeping at least `min_keep` of the highest.
pub fn top_p(scores: &mut [f32], p: f32, min_keep: usize) {
    if p >= 1.0 {
        return;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // A stable ascending sort, as torch.sort on CPU orders ties by index.
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let keep_from = order.len().saturating_sub(min_keep);
    let mut cum = 0.0f32;
    for (rank, (&i, pr)) in order.iter().zip(probs).enumerate() {
        cum += pr;
        if cum <= 1.0 - p && rank < keep_from {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f32 with the maximum subtracted.
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Index of the highest score; the first one among equals (torch's `argmax`).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// Applies the configured processors to `scores` in transformers' order. `seen` is the row's
/// sequence so far (prompt and generated tokens) for the repetition penalty.
pub fn process(scores: &mut [f32], seen: &[u32], cfg: &SamplingConfig) {
    repetition_penalty(scores, seen, cfg.repetition_penalty);
    if cfg.do_sample {
        temperature(scores, cfg.temperature);
        if cfg.top_k > 0 {
            top_k(scores, cfg.top_k, 1);
        }
        top_p(scores, cfg.top_p, 1);
    }
}

/// Picks the next token from processed scores: argmax, or a draw from their softmax.
pub fn choose(scores: &[f32], do_sample: bool, rng: &mut StdRng) -> u32 {
    if !do_sample {
        return argmax(scores);
    }
    let probs = softmax(scores);
    let mut u: f32 = rng.random();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    // Rounding left a sliver: the last token with any mass.
    probs.iter().rposition(|p| *p > 0.0).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_one() {
        let mut s = vec![1.0, 3.0, 3.0, 2.0];
        top_k(&mut s, 1, 1);
        assert_eq!(s, vec![f32::NEG_INFINITY, 3.0, 3.0, f32::NEG_INFINITY]);
        let mut s = vec![0.0, 10.0, 0.0];
        top_p(&mut s, 0.01, 1);
        assert_eq!(s, vec![f32::NEG_INFINITY, 10.0, f32::NEG_INFINITY]);
    }
}
