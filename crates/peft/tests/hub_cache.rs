//! Finding a base model by its Hugging Face name in a fake Hugging Face cache (huggingface_hub's
//! layout: `models--org--name/refs/main` + `snapshots/<rev>/`), without network access.

use peft::io::hub::resolve_model_in;

#[test]
fn resolves_the_main_revision_snapshot_and_local_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let repo = cache.join("models--HuggingFaceTB--SmolLM2-135M-Instruct");
    for rev in ["aaaa1111", "bbbb2222"] {
        std::fs::create_dir_all(repo.join("snapshots").join(rev)).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "bbbb2222\n").unwrap();
    let got = resolve_model_in("HuggingFaceTB/SmolLM2-135M-Instruct", None, Some(&cache)).unwrap();
    assert_eq!(got, repo.join("snapshots/bbbb2222"));

    // A local path wins, also relative to the adapter's directory.
    let local = tmp.path().join("models/base");
    std::fs::create_dir_all(&local).unwrap();
    let got = resolve_model_in(local.to_str().unwrap(), None, Some(&cache)).unwrap();
    assert_eq!(got, local);
    std::fs::create_dir_all(tmp.path().join("adapter")).unwrap();
    let got = resolve_model_in(
        "../models/base",
        Some(&tmp.path().join("adapter")),
        Some(&cache),
    );
    assert_eq!(got.unwrap(), tmp.path().join("adapter/../models/base"));
}

#[test]
fn a_missing_base_model_names_every_place_tried() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let err = resolve_model_in("org/absent-model", Some(tmp.path()), Some(&cache))
        .unwrap_err()
        .to_string();
    assert!(err.contains("org/absent-model"), "{err}");
    assert!(
        err.contains(&tmp.path().join("org/absent-model").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains(
            &cache
                .join("models--org--absent-model")
                .display()
                .to_string()
        ),
        "{err}"
    );
}

#[test]
fn the_cache_directory_follows_huggingface_hub_variables() {
    // One test changes the environment, so the three cases run in sequence here.
    std::env::set_var("HF_HUB_CACHE", "/x/hub-cache");
    std::env::set_var("HF_HOME", "/x/hf-home");
    assert_eq!(
        peft::io::hub::hub_cache_dir().unwrap(),
        std::path::Path::new("/x/hub-cache")
    );
    std::env::remove_var("HF_HUB_CACHE");
    assert_eq!(
        peft::io::hub::hub_cache_dir().unwrap(),
        std::path::Path::new("/x/hf-home/hub")
    );
    std::env::remove_var("HF_HOME");
    std::env::set_var("HOME", "/x/home");
    assert_eq!(
        peft::io::hub::hub_cache_dir().unwrap(),
        std::path::Path::new("/x/home/.cache/huggingface/hub")
    );
}
