//! Which modules an adapter attaches to, by PEFT's rules (`check_target_module_exists`):
//! a string is a regex that must match the whole module name; a list matches a name exactly or as
//! a `.suffix`; `layers_to_transform` narrows list matches to layer indices; `exclude_modules`
//! follows the same rules; modules in `modules_to_save` are never targeted.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::config_err;
use crate::Result;

/// `target_modules` / `exclude_modules`: a full-match regex or a list of names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSpec {
    Regex(String),
    List(Vec<String>),
}

impl ModuleSpec {
    pub fn is_all_linear(&self) -> bool {
        matches!(self, ModuleSpec::Regex(s) if s.eq_ignore_ascii_case("all-linear"))
    }

    pub fn describe(&self) -> String {
        match self {
            ModuleSpec::Regex(s) => format!("`{s}` (regex)"),
            ModuleSpec::List(v) => format!("{v:?}"),
        }
    }
}

/// A string is a regex that must match a whole module name, as in PEFT (`"all-linear"` included).
impl From<&str> for ModuleSpec {
    fn from(s: &str) -> Self {
        ModuleSpec::Regex(s.to_string())
    }
}

/// A list matches module names exactly or by their `.`-separated ending, as in PEFT.
impl From<&[&str]> for ModuleSpec {
    fn from(v: &[&str]) -> Self {
        ModuleSpec::List(v.iter().map(|s| s.to_string()).collect())
    }
}

impl<const N: usize> From<[&str; N]> for ModuleSpec {
    fn from(v: [&str; N]) -> Self {
        ModuleSpec::from(&v[..])
    }
}

impl From<Vec<String>> for ModuleSpec {
    fn from(v: Vec<String>) -> Self {
        ModuleSpec::List(v)
    }
}

/// An integer or a list of integers (`layers_to_transform`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(x) => vec![x.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A compiled matcher for one adapter config.
pub struct TargetMatcher {
    targets: Compiled,
    exclude: Option<Compiled>,
    modules_to_save: Vec<Regex>,
    layers: Option<Vec<usize>>,
    layer_patterns: Vec<Regex>,
}

enum Compiled {
    Regex(Regex),
    List(Vec<String>),
}

impl Compiled {
    fn new(spec: &ModuleSpec, field: &str) -> Result<Self> {
        Ok(match spec {
            ModuleSpec::Regex(s) => Compiled::Regex(full_match(s, field)?),
            ModuleSpec::List(v) => Compiled::List(v.clone()),
        })
    }

    fn matches(&self, key: &str) -> bool {
        match self {
            Compiled::Regex(r) => r.is_match(key),
            Compiled::List(v) => v
                .iter()
                .any(|t| key == t || key.ends_with(&format!(".{t}"))),
        }
    }
}

fn full_match(pattern: &str, field: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| config_err!("{field}: invalid regex `{pattern}`: {e}"))
}

impl TargetMatcher {
    pub fn new(
        targets: &ModuleSpec,
        exclude: Option<&ModuleSpec>,
        modules_to_save: &[String],
        layers_to_transform: Option<&OneOrMany<usize>>,
        layers_pattern: Option<&OneOrMany<String>>,
    ) -> Result<Self> {
        let layers = layers_to_transform
            .map(|l| l.to_vec())
            .filter(|l| !l.is_empty());
        if matches!(targets, ModuleSpec::Regex(_)) && (layers.is_some() || layers_pattern.is_some())
        {
            return Err(config_err!(
                "`layers_to_transform` and `layers_pattern` only work with a list of target_modules, not a regex string"
            ));
        }
        if layers_pattern.is_some_and(|p| !p.to_vec().is_empty()) && layers.is_none() {
            return Err(config_err!("`layers_pattern` needs `layers_to_transform`"));
        }
        let layer_patterns = match layers_pattern {
            Some(p) if !p.to_vec().is_empty() => p
                .to_vec()
                .iter()
                .map(|p| {
                    Regex::new(&format!(r"^(?:|.*?\.){p}\.(\d+)\."))
                        .map_err(|e| config_err!("layers_pattern `{p}`: {e}"))
                })
                .collect::<Result<_>>()?,
            _ => vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("static regex")],
        };
        let modules_to_save = modules_to_save
            .iter()
            .map(|m| {
                Regex::new(&format!(r"^(?:|.*\.){m}(?:$|\..*)"))
                    .map_err(|e| config_err!("modules_to_save `{m}`: {e}"))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            targets: Compiled::new(targets, "target_modules")?,
            exclude: exclude
                .map(|e| Compiled::new(e, "exclude_modules"))
                .transpose()?,
            modules_to_save,
            layers,
            layer_patterns,
        })
    }

    /// Whether the module `key` gets the adapter.
    pub fn matches(&self, key: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(key)) {
            return false;
        }
        if self.modules_to_save.iter().any(|r| r.is_match(key)) {
            return false;
        }
        if !self.targets.matches(key) {
            return false;
        }
        match (&self.targets, &self.layers) {
            (Compiled::List(_), Some(layers)) => {
                let idx = self
                    .layer_patterns
                    .iter()
                    .find_map(|p| p.captures(key))
                    .and_then(|c| c.get(1))
                    .and_then(|m| m.as_str().parse::<usize>().ok());
                idx.is_some_and(|i| layers.contains(&i))
            }
            _ => true,
        }
    }
}

/// `rank_pattern` / `alpha_pattern` lookup: the first pattern key `k` for which
/// `(.*\.)?(k)$` matches the module name from its start.
pub fn pattern_value<T: Copy>(
    patterns: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    parse: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Option<T>> {
    for (pattern, value) in patterns {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
            .map_err(|e| config_err!("pattern `{pattern}`: {e}"))?;
        if re.is_match(key) {
            return parse(value).map(Some).ok_or_else(|| {
                config_err!("pattern `{pattern}`: value {value} has the wrong type")
            });
        }
    }
    Ok(None)
}

/// Whether a module named `key` (or one of its ancestors) is one of `modules_to_save`. PEFT wraps
/// any module whose name *ends with* an entry, so a leaf is covered when any prefix of its path
/// does.
pub fn in_modules_to_save(key: &str, modules_to_save: &[String]) -> bool {
    let mut prefix_ends = key.match_indices('.').map(|(i, _)| i).collect::<Vec<_>>();
    prefix_ends.push(key.len());
    prefix_ends.into_iter().any(|end| {
        modules_to_save
            .iter()
            .any(|m| key[..end].ends_with(m.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> ModuleSpec {
        ModuleSpec::List(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn list_matches_exact_or_dotted_suffix_only() {
        let m = TargetMatcher::new(&list(&["query"]), None, &[], None, None).unwrap();
        assert!(m.matches("bert.encoder.layer.0.attention.self.query"));
        assert!(m.matches("query"));
        assert!(!m.matches("bert.encoder.layer.0.attention.self.myquery"));
        assert!(!m.matches("bert.encoder.layer.0.attention.self.query.x"));
    }

    #[test]
    fn regex_must_match_the_whole_name() {
        let m =
            TargetMatcher::new(&ModuleSpec::Regex("query".into()), None, &[], None, None).unwrap();
        assert!(!m.matches("a.query"));
        let m = TargetMatcher::new(
            &ModuleSpec::Regex(r".*\.query".into()),
            None,
            &[],
            None,
            None,
        )
        .unwrap();
        assert!(m.matches("a.query"));
    }

    #[test]
    fn layers_to_transform_uses_first_numbered_segment() {
        let m = TargetMatcher::new(
            &list(&["dense"]),
            None,
            &[],
            Some(&OneOrMany::Many(vec![1])),
            Some(&OneOrMany::One("layer".into())),
        )
        .unwrap();
        assert!(m.matches("bert.encoder.layer.1.output.dense"));
        assert!(!m.matches("bert.encoder.layer.0.output.dense"));
        assert!(!m.matches("bert.pooler.dense"));
    }

    #[test]
    fn modules_to_save_and_exclude_win() {
        let m = TargetMatcher::new(
            &list(&["dense"]),
            Some(&list(&["pooler.dense"])),
            &["classifier".into()],
            None,
            None,
        )
        .unwrap();
        assert!(!m.matches("bert.pooler.dense"));
        assert!(m.matches("bert.encoder.layer.0.output.dense"));
        let m = TargetMatcher::new(&list(&["dense"]), None, &["classifier".into()], None, None)
            .unwrap();
        assert!(!m.matches("classifier.dense"));
    }

    #[test]
    fn rank_pattern_matches_from_a_dot_boundary() {
        let mut p = serde_json::Map::new();
        p.insert("layer.1.attention.self.query".into(), 4.into());
        let get = |k: &str| pattern_value(&p, k, |v| v.as_u64()).unwrap();
        assert_eq!(get("bert.encoder.layer.1.attention.self.query"), Some(4));
        assert_eq!(get("bert.encoder.layer.11.attention.self.query"), None);
        assert_eq!(get("bert.encoder.layer.0.attention.self.query"), None);
    }
}
