//! Data-parallel `peft train` under `mpirun -np 2` on the tiny BERT fixture (CPU): two processes
//! of batch 4 train the adapter one process of batch 8 trains (the single process is the
//! truth), a resume crosses process counts, dropout masks differ per rank and resume exactly,
//! a killed rank stops the job with its last checkpoint intact, and ranks that disagree on the
//! config refuse to train. Skipped, saying why, without `--features mpi` or without `mpirun`
//! (CI installs Open MPI and runs them); a build without MPI is tested to refuse an MPI launch.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{peft, peft_fixtures, write_word_tokenizer};

/// `mpirun`, when this build has MPI and the machine has Open MPI; else why not (printed).
fn mpirun() -> Option<PathBuf> {
    if !cfg!(feature = "mpi") {
        eprintln!("skipped: peft-cli built without --features mpi");
        return None;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("mpirun"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!("skipped: no mpirun on PATH (apt-get install openmpi-bin libopenmpi-dev)");
    }
    found
}

/// `mpirun -np N peft ARGS` (as root in containers, on however few cores, one thread each).
fn mpi_command(mpirun: &Path, np: usize, args: &[&str]) -> Command {
    let mut c = Command::new(mpirun);
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .args(["-x", "RAYON_NUM_THREADS=1", "-np", &np.to_string()])
    .arg(env!("CARGO_BIN_EXE_peft"))
    .args(args);
    c
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mpi_run(mpirun: &Path, np: usize, args: &[&str]) -> (bool, String) {
    let out = mpi_command(mpirun, np, args).output().expect("run mpirun");
    (out.status.success(), text(&out))
}

/// A copy of the fixture model with a word-level tokenizer; `dropout`: BERT's hidden and
/// attention dropout (0 for the exactness tests).
fn model_copy(dir: &Path, dropout: f64) -> PathBuf {
    let src = peft_fixtures().join("bert/models/seq_cls");
    let dst = dir.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["hidden_dropout_prob"] = dropout.into();
    config["attention_probs_dropout_prob"] = dropout.into();
    std::fs::write(dst.join("config.json"), config.to_string()).unwrap();
    write_word_tokenizer(&dst.join("tokenizer.json"));
    dst
}

/// `n` labelled rows (all the same row when `identical`).
fn write_data(path: &Path, n: usize, identical: bool) {
    let mut csv = String::from("sentence,y\n");
    for i in 0..n {
        let j = if identical { 0 } else { i };
        csv += &format!(
            "{} token{} token{},{}\n",
            ["good", "bad", "meh"][j % 3],
            j,
            (j * 7) % 50,
            ["pos", "neg", "mid"][j % 3]
        );
    }
    std::fs::write(path, csv).unwrap();
}

/// A job: LoRA on query/value with `lora_dropout`, 32 training rows, 6 steps, every step logged.
fn write_config(dir: &Path, name: &str, dropout: f64, identical: bool, extra: &str) -> PathBuf {
    let model = model_copy(dir, dropout);
    let train = dir.join("train.csv");
    let eval = dir.join("eval.csv");
    write_data(&train, 32, identical);
    write_data(&eval, 9, identical);
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\ntask_type = \"SEQ_CLS\"\n[peft]\npeft_type = \"LORA\"\nr = 4\n\
             lora_alpha = 8\nlora_dropout = {dropout}\ntarget_modules = [\"query\", \"value\"]\n\
             [data]\ntrain_file = \"{}\"\neval_file = \"{}\"\ntext_column = \"sentence\"\n\
             label_column = \"y\"\n[training]\noutput_dir = \"{}\"\nlearning_rate = 1e-2\n\
             max_steps = 6\nper_device_train_batch_size = 4\nlogging_steps = 1\n\
             eval_strategy = \"steps\"\neval_steps = 3\nsave_steps = 2\nseed = 7\n{extra}",
            model.display(),
            train.display(),
            eval.display(),
            dir.join(name).display()
        ),
    )
    .unwrap();
    cfg
}

fn adapter(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

fn max_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, t)| {
            (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

/// metrics.jsonl without the throughput (which differs between runs by nature).
fn metrics(dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut m: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(l).unwrap();
            m.remove("examples_per_second");
            m.remove("eval_runtime");
            m.remove("eval_samples_per_second");
            m
        })
        .collect()
}

fn assert_same_metrics(
    a: &[serde_json::Map<String, serde_json::Value>],
    b: &[serde_json::Map<String, serde_json::Value>],
) {
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            x.keys().collect::<Vec<_>>(),
            y.keys().collect::<Vec<_>>(),
            "{x:?} vs {y:?}"
        );
        for (k, v) in x {
            let (p, q) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!(
                (p - q).abs() <= 1e-6 * (1.0 + p.abs()),
                "{k}: {p} vs {q} ({x:?} vs {y:?})"
            );
        }
    }
}

#[test]
fn two_processes_of_batch_4_train_the_adapter_of_one_process_of_batch_8() {
    let Some(mpirun) = mpirun() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "job", 0.0, false, "");
    let c = cfg.to_str().unwrap();
    // The truth: one process, batch 8, the same seed (so the same data order).
    let (ok, log) = peft(&[
        "train",
        "--config",
        c,
        "--set",
        "training.per_device_train_batch_size=8",
        "--set",
        &format!(
            "training.output_dir=\"{}\"",
            tmp.path().join("single").display()
        ),
    ]);
    assert!(ok, "{log}");
    let (ok, log) = mpi_run(&mpirun, 2, &["train", "--config", c]);
    assert!(ok, "{log}");
    // Rank 0 alone reports and writes.
    assert_eq!(log.matches("trained 6 steps").count(), 1, "{log}");
    assert!(
        log.contains("data-parallel on 2 processes: effective batch 8"),
        "{log}"
    );
    assert!(log.contains("all-reduce:"), "{log}");
    let (single, dist) = (tmp.path().join("single"), tmp.path().join("job"));
    let d = max_diff(&adapter(&single), &adapter(&dist));
    assert!(d <= 1e-6, "2 x 4 differs from 1 x 8 by {d}");
    // The same losses, learning rates, gradient norms, epochs and evaluations.
    assert_same_metrics(&metrics(&single), &metrics(&dist));
    for f in [
        "checkpoint-6",
        "eval_results.json",
        "curves.png",
        "README.md",
    ] {
        assert!(dist.join(f).exists(), "{f}");
    }

    // The data position is global: the single process's checkpoint-2, resumed by two
    // processes of batch 4, ends where the single process ended.
    let resumed = tmp.path().join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    copy_dir(&single.join("checkpoint-2"), &resumed.join("checkpoint-2"));
    let out = format!("training.output_dir=\"{}\"", resumed.display());
    let (ok, log) = mpi_run(
        &mpirun,
        2,
        &["train", "--config", c, "--resume", "--set", &out],
    );
    assert!(ok && log.contains("resuming from"), "{log}");
    let d = max_diff(&adapter(&single), &adapter(&resumed));
    assert!(d <= 1e-6, "1 x 8 resumed on 2 x 4 differs by {d}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The first step's gradient norm in `dir`'s metrics.
fn first_grad_norm(dir: &Path) -> f64 {
    metrics(dir)[0]["grad_norm"].as_f64().unwrap()
}

#[test]
fn dropout_masks_differ_per_rank_and_a_resume_is_exact() {
    let Some(mpirun) = mpirun() else { return };
    // Every row the same: two ranks drawing the same masks would give the gradient of one rank
    // alone (one process of batch 4, whose masks are rank 0's); distinct masks do not.
    for (dropout, same) in [(0.0, true), (0.1, false)] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = write_config(tmp.path(), "job", dropout, true, "");
        let c = cfg.to_str().unwrap();
        let one = format!(
            "training.output_dir=\"{}\"",
            tmp.path().join("one").display()
        );
        let (ok, log) = peft(&["train", "--config", c, "--set", &one]);
        assert!(ok, "{log}");
        let (ok, log) = mpi_run(&mpirun, 2, &["train", "--config", c]);
        assert!(ok, "{log}");
        let (a, b) = (
            first_grad_norm(&tmp.path().join("one")),
            first_grad_norm(&tmp.path().join("job")),
        );
        assert_eq!(
            (a - b).abs() <= 1e-6 * a,
            same,
            "dropout {dropout}: first-step gradient norm {a} (1 process) vs {b} (2 ranks)"
        );
    }

    // A resume of the two-rank dropout run from checkpoint-2 ends with its adapter.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "job", 0.1, false, "");
    let c = cfg.to_str().unwrap();
    let (ok, log) = mpi_run(&mpirun, 2, &["train", "--config", c]);
    assert!(ok, "{log}");
    let out = tmp.path().join("job");
    let first = adapter(&out);
    for f in ["checkpoint-4", "checkpoint-6", "adapter_model.safetensors"] {
        let p = out.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-2/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2);
    let draws = state["dropout_draws_by_rank"].as_array().unwrap();
    assert_eq!(draws.len(), 2);
    let (ok, log) = mpi_run(&mpirun, 2, &["train", "--config", c, "--resume"]);
    assert!(ok && log.contains("checkpoint-2"), "{log}");
    let d = max_diff(&first, &adapter(&out));
    assert!(d <= 1e-6, "the resumed dropout run differs by {d}");
}

#[test]
fn killing_a_rank_stops_the_job_and_keeps_the_last_checkpoint() {
    let Some(mpirun) = mpirun() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "job", 0.0, false, "save_total_limit = 2\n");
    let c = cfg.to_str().unwrap();
    let sets = [
        "--set",
        "training.max_steps=100000",
        "--set",
        "training.eval_strategy=no",
    ];
    // The job's output goes to a file: an unread pipe would fill and stall it.
    let log_path = tmp.path().join("job.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut job = mpi_command(&mpirun, 2, &[&["train", "--config", c][..], &sets].concat())
        .stdout(Stdio::from(log_file.try_clone().unwrap()))
        .stderr(Stdio::from(log_file))
        .spawn()
        .unwrap();
    let out = tmp.path().join("job");
    let t = Instant::now();
    // Some checkpoint from step 4 on (save_total_limit deletes the older ones as it goes, so
    // waiting for one name could miss it).
    while !checkpoints(&out).iter().any(|&n| n >= 4) {
        if let Some(s) = job.try_wait().unwrap() {
            panic!(
                "the job ended ({s}) before checkpoint-4: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint-4");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rank1 = rank_pid(job.id(), 1).expect("rank 1's process");
    Command::new("kill")
        .args(["-9", &rank1.to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the job kept running"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("rank 1") && log.contains("signal 9"), "{log}");
    // The newest checkpoint is whole: a single process resumes from it and trains on.
    let (n, last) = newest_checkpoint(&out);
    let steps = format!("training.max_steps={}", n + 2);
    let (ok, log) = peft(&[
        "train",
        "--config",
        c,
        "--resume",
        "--set",
        &steps,
        "--set",
        "training.eval_strategy=no",
    ]);
    assert!(
        ok && log.contains(&format!("checkpoint-{n}")),
        "{}: {log}",
        last.display()
    );
    assert!(out.join("adapter_model.safetensors").exists());
}

/// The `peft` process of MPI rank `rank` among `mpirun`'s children.
fn rank_pid(mpirun_pid: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid: u32 = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let is_rank = env.split(|&b| b == 0).any(|v| v == want.as_bytes());
        (ppid == mpirun_pid && is_rank).then_some(pid)
    })
}

/// The step numbers of the `checkpoint-N` directories in `out` now.
fn checkpoints(out: &Path) -> Vec<usize> {
    let Ok(dir) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .collect()
}

fn newest_checkpoint(out: &Path) -> (usize, PathBuf) {
    std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .max()
        .expect("a checkpoint")
}

#[test]
fn ranks_that_disagree_on_the_config_stop_with_a_clear_error() {
    let Some(mpirun) = mpirun() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let a = write_config(tmp.path(), "a", 0.0, false, "");
    let b = write_config(tmp.path(), "b", 0.0, false, "");
    // Same output_dir, another learning rate: rank 1 runs another job.
    let text_b = std::fs::read_to_string(&b)
        .unwrap()
        .replace("learning_rate = 1e-2", "learning_rate = 2e-2")
        .replace(
            &*tmp.path().join("b").to_string_lossy(),
            &tmp.path().join("a").to_string_lossy(),
        );
    std::fs::write(&b, text_b).unwrap();
    let peft_bin = env!("CARGO_BIN_EXE_peft");
    let out = Command::new(&mpirun)
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args([
            "-np",
            "1",
            peft_bin,
            "train",
            "--config",
            a.to_str().unwrap(),
        ])
        .args([
            ":",
            "-np",
            "1",
            peft_bin,
            "train",
            "--config",
            b.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("rank 1 disagrees with rank 0"), "{log}");
    assert!(!tmp.path().join("a/checkpoint-2").exists(), "{log}");
}

/// A build without MPI refuses a launch of several processes instead of training N
/// independent copies over each other's output.
#[test]
fn an_mpi_launch_of_a_build_without_mpi_is_refused() {
    if cfg!(feature = "mpi") {
        eprintln!("skipped: this build has MPI (the MPI tests above run instead)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "job", 0.0, false, "");
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("OMPI_COMM_WORLD_SIZE", "4")
        .env("OMPI_COMM_WORLD_RANK", "0")
        .output()
        .unwrap();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("launched as one of 4 processes") && log.contains("--features mpi"),
        "{log}"
    );
    assert!(!tmp.path().join("job").exists());
}
