//! Finding a model named the way Hugging Face names it (`org/name`, as an adapter's
//! `base_model_name_or_path` does) without any network access: a local path, or a snapshot in
//! the Hugging Face cache that `huggingface_hub` filled earlier.
//!
//! Cache layout (huggingface_hub's): `<cache>/models--org--name/refs/main` holds a commit hash,
//! `<cache>/models--org--name/snapshots/<hash>/` holds the files.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The cache directory huggingface_hub uses: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = var("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Resolves `name_or_path` to a local directory (or file): the path itself if it exists
/// (relative paths also against `relative_to`, the adapter's directory), else the cached snapshot
/// of the `main` revision. The error lists every place looked at.
pub fn resolve_model(name_or_path: &str, relative_to: Option<&Path>) -> Result<PathBuf> {
    resolve_model_in(name_or_path, relative_to, hub_cache_dir().as_deref())
}

/// [`resolve_model`] with an explicit cache directory.
pub fn resolve_model_in(
    name_or_path: &str,
    relative_to: Option<&Path>,
    cache: Option<&Path>,
) -> Result<PathBuf> {
    let mut tried = Vec::new();
    let direct = PathBuf::from(name_or_path);
    if direct.exists() {
        return Ok(direct);
    }
    tried.push(direct.display().to_string());
    if let Some(base) = relative_to.filter(|_| direct.is_relative()) {
        let p = base.join(&direct);
        if p.exists() {
            return Ok(p);
        }
        tried.push(p.display().to_string());
    }
    match cache {
        Some(cache) if is_repo_id(name_or_path) => {
            let repo = cache.join(format!("models--{}", name_or_path.replace('/', "--")));
            let refs = repo.join("refs").join("main");
            match std::fs::read_to_string(&refs) {
                Ok(rev) => {
                    let snap = repo.join("snapshots").join(rev.trim());
                    if snap.is_dir() {
                        return Ok(snap);
                    }
                    tried.push(format!(
                        "{} (revision from {})",
                        snap.display(),
                        refs.display()
                    ));
                }
                Err(_) => {
                    // Without refs/main (a cache copied by hand), one snapshot is unambiguous.
                    let snaps = repo.join("snapshots");
                    let found: Vec<PathBuf> = std::fs::read_dir(&snaps)
                        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                        .unwrap_or_default();
                    if let [only] = found.as_slice() {
                        return Ok(only.clone());
                    }
                    tried.push(format!(
                        "{} (no {}{})",
                        snaps.display(),
                        refs.display(),
                        if found.is_empty() {
                            String::new()
                        } else {
                            format!(" and {} snapshots to choose from", found.len())
                        }
                    ));
                }
            }
        }
        Some(_) => {}
        None => tried.push("the Hugging Face cache (HOME, HF_HOME and HF_HUB_CACHE unset)".into()),
    }
    Err(Error::Config(format!(
        "base model `{name_or_path}` not found; looked in: {}. Pass the model directory \
         explicitly, or download it into the Hugging Face cache first (no network access is used)",
        tried.join("; ")
    )))
}

/// `org/name` or `name`: what a Hub repository id looks like (not an absolute or dotted path).
fn is_repo_id(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.starts_with('.')
        && s.split('/').count() <= 2
        && s.split('/').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}
