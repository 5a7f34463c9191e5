//! Evaluation metrics with the definitions people compare against: scikit-learn's macro
//! averages, seqeval's entity-level F1 (default, lenient IOB mode), perplexity as `exp(mean
//! token loss)`, and the SQuAD script's exact match and F1 (in percent).

use std::collections::{BTreeMap, BTreeSet};

/// Metric name → value (`accuracy`, `f1`, `loss`, ...).
pub type Metrics = BTreeMap<String, f64>;

/// Accuracy and macro-averaged precision, recall and F1 over the classes that occur in either
/// the gold or the predicted labels (scikit-learn's `average="macro"`, `zero_division=0`).
pub fn classification(pred: &[i64], gold: &[i64]) -> Metrics {
    let n = gold.len().max(1) as f64;
    let correct = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    let classes: BTreeSet<i64> = pred.iter().chain(gold).copied().collect();
    let (mut p_sum, mut r_sum, mut f_sum) = (0.0, 0.0, 0.0);
    for &c in &classes {
        let tp = pred
            .iter()
            .zip(gold)
            .filter(|(p, g)| **p == c && **g == c)
            .count() as f64;
        let pp = pred.iter().filter(|&&p| p == c).count() as f64;
        let gp = gold.iter().filter(|&&g| g == c).count() as f64;
        let prec = if pp > 0.0 { tp / pp } else { 0.0 };
        let rec = if gp > 0.0 { tp / gp } else { 0.0 };
        p_sum += prec;
        r_sum += rec;
        f_sum += if prec + rec > 0.0 {
            2.0 * prec * rec / (prec + rec)
        } else {
            0.0
        };
    }
    let k = classes.len().max(1) as f64;
    Metrics::from([
        ("accuracy".into(), correct as f64 / n),
        ("precision".into(), p_sum / k),
        ("recall".into(), r_sum / k),
        ("f1".into(), f_sum / k),
    ])
}

/// Entities `(type, first, last)` of a tag sequence, as seqeval's default mode reads IOB tags:
/// an entity starts at `B-X`, or at `I-X` after anything but `B-X`/`I-X`, and runs while `I-X`
/// follows. Tags without a `B-`/`I-` prefix other than `O` are their own type.
pub fn entities(tags: &[String]) -> Vec<(String, usize, usize)> {
    let split = |t: &str| -> (char, String) {
        match t.split_once('-') {
            Some((p, ty)) if p.len() == 1 => (p.chars().next().unwrap_or('O'), ty.to_string()),
            _ if t == "O" => ('O', String::new()),
            _ => ('B', t.to_string()),
        }
    };
    let mut out = Vec::new();
    let mut cur: Option<(String, usize)> = None;
    for (i, t) in tags.iter().enumerate() {
        let (p, ty) = split(t);
        let continues = matches!(p, 'I' | 'E') && cur.as_ref().is_some_and(|(c, _)| *c == ty);
        if !continues {
            if let Some((c, s)) = cur.take() {
                out.push((c, s, i - 1));
            }
            if p != 'O' {
                cur = Some((ty, i));
            }
        }
    }
    if let Some((c, s)) = cur {
        out.push((c, s, tags.len() - 1));
    }
    out
}

/// seqeval's micro-averaged entity precision, recall and F1, plus token accuracy.
pub fn entity_f1(pred: &[Vec<String>], gold: &[Vec<String>]) -> Metrics {
    let (mut tp, mut np, mut ng) = (0usize, 0usize, 0usize);
    let (mut correct, mut tokens) = (0usize, 0usize);
    for (p, g) in pred.iter().zip(gold) {
        let pe: BTreeSet<_> = entities(p).into_iter().collect();
        let ge: BTreeSet<_> = entities(g).into_iter().collect();
        tp += pe.intersection(&ge).count();
        np += pe.len();
        ng += ge.len();
        correct += p.iter().zip(g).filter(|(a, b)| a == b).count();
        tokens += g.len();
    }
    let prec = if np > 0 { tp as f64 / np as f64 } else { 0.0 };
    let rec = if ng > 0 { tp as f64 / ng as f64 } else { 0.0 };
    let f1 = if prec + rec > 0.0 {
        2.0 * prec * rec / (prec + rec)
    } else {
        0.0
    };
    Metrics::from([
        ("precision".into(), prec),
        ("recall".into(), rec),
        ("f1".into(), f1),
        ("accuracy".into(), correct as f64 / tokens.max(1) as f64),
    ])
}

/// The SQuAD script's answer normalisation: lower case, no punctuation, no articles, single
/// spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Exact match and token F1 of one prediction (0 or 1, and 0..=1).
pub fn squad_scores(pred: &str, gold: &str) -> (f64, f64) {
    let (p, g) = (normalize_answer(pred), normalize_answer(gold));
    let em = f64::from(u8::from(p == g));
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    if pt.is_empty() || gt.is_empty() {
        return (em, f64::from(u8::from(pt == gt)));
    }
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for w in &gt {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0;
    for w in &pt {
        if let Some(c) = counts.get_mut(w) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return (em, 0.0);
    }
    let prec = common as f64 / pt.len() as f64;
    let rec = common as f64 / gt.len() as f64;
    (em, 2.0 * prec * rec / (prec + rec))
}

/// `exact_match` and `f1` in percent over all predictions, as the `squad` metric reports them.
pub fn squad(pred: &[String], gold: &[String]) -> Metrics {
    let n = gold.len().max(1) as f64;
    let (mut em, mut f1) = (0.0, 0.0);
    for (p, g) in pred.iter().zip(gold) {
        let (e, f) = squad_scores(p, g);
        em += e;
        f1 += f;
    }
    Metrics::from([
        ("exact_match".into(), 100.0 * em / n),
        ("f1".into(), 100.0 * f1 / n),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn macro_scores_by_hand() {
        // Class 0: tp 1, predicted 2, gold 2 -> p = r = f = 1/2.
        // Class 1: tp 1, predicted 1, gold 2 -> p 1, r 1/2, f 2/3.
        // Class 2: tp 0, predicted 1, gold 0 -> 0.
        let m = classification(&[0, 0, 1, 2], &[0, 1, 1, 0]);
        assert!((m["accuracy"] - 0.5).abs() < 1e-12);
        assert!((m["precision"] - (0.5 + 1.0) / 3.0).abs() < 1e-12);
        assert!((m["recall"] - (0.5 + 0.5) / 3.0).abs() < 1e-12);
        assert!((m["f1"] - (0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn entities_as_seqeval_reads_them() {
        assert_eq!(
            entities(&tags("B-PER I-PER O I-LOC I-LOC B-LOC B-ORG I-PER")),
            vec![
                ("PER".into(), 0, 1),
                ("LOC".into(), 3, 4),
                ("LOC".into(), 5, 5),
                ("ORG".into(), 6, 6),
                ("PER".into(), 7, 7),
            ]
        );
        // Gold: PER(0-1), LOC(3); predicted: PER(0-0) wrong span, LOC(3) right.
        let m = entity_f1(&[tags("B-PER O O B-LOC")], &[tags("B-PER I-PER O B-LOC")]);
        assert!((m["precision"] - 0.5).abs() < 1e-12);
        assert!((m["recall"] - 0.5).abs() < 1e-12);
        assert!((m["accuracy"] - 0.75).abs() < 1e-12);
    }

    #[test]
    fn squad_normalises_and_scores_tokens() {
        assert_eq!(
            squad_scores("The Eiffel Tower!", "eiffel tower"),
            (1.0, 1.0)
        );
        // pred {in, paris}, gold {paris, france}: one common token, p = r = 1/2.
        let (em, f1) = squad_scores("in Paris", "Paris, France");
        assert_eq!(em, 0.0);
        assert!((f1 - 0.5).abs() < 1e-12);
        let m = squad(&["a".into(), "x y".into()], &["".into(), "x z".into()]);
        assert!((m["exact_match"] - 50.0).abs() < 1e-9);
        assert!((m["f1"] - 75.0).abs() < 1e-9);
    }
}
