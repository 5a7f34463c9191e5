//! The training loop on the tiny fixture models: gradient accumulation equals a larger batch,
//! a run resumed from a checkpoint (or stopped as Ctrl-C stops it) ends with the adapter of an
//! uninterrupted run, a non-finite loss stops with a clear message, and a run leaves its logs,
//! curves and model card behind.

use candle_core::Tensor;
use peft::models::{self, LoadOptions};
use peft::peft_model::{get_peft_model_with_seed, PeftModel, WEIGHTS_NAME};
use peft::train::config::{Interval, TrainingArguments};
use peft::train::data::{CollateOptions, Example, PaddingSide, Target};
use peft::train::{Outcome, StopSignal, Trainer};
use peft::tuners::lora::LoraConfig;
use peft::tuners::targets::ModuleSpec;
use peft::tuners::BaseFields;
use peft::TaskType;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bert/models")
        .join(name)
}

/// A copy of a fixture model with dropout switched off, so that micro-batches and one large
/// batch see the same function.
fn without_dropout(name: &str, tmp: &Path) -> PathBuf {
    let dir = tmp.join(format!("{name}-nodrop"));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture_model(name);
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg = peft::io::read_json(&src.join("config.json")).unwrap();
    cfg["hidden_dropout_prob"] = 0.0.into();
    cfg["attention_probs_dropout_prob"] = 0.0.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn model(dir: &Path, task: TaskType, lora_dropout: f64) -> PeftModel {
    let opts = LoadOptions {
        task: Some(task),
        ..Default::default()
    };
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout,
        target_modules: Some(ModuleSpec::List(vec!["query".into(), "value".into()])),
        base: BaseFields {
            task_type: Some(task),
            ..Default::default()
        },
        ..Default::default()
    };
    get_peft_model_with_seed(models::load(dir, &opts).unwrap(), config, "default", 3).unwrap()
}

/// Random examples of 4..12 tokens (ids < 1000, the fixtures' vocabulary).
fn examples(task: TaskType, n: usize, classes: i64) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    (0..n)
        .map(|_| {
            let len = rng.random_range(4..12);
            let mut ids: Vec<u32> = (0..len).map(|_| rng.random_range(110..999)).collect();
            ids[0] = 101;
            let target = match task {
                TaskType::TokenCls => Target::Tokens(
                    (0..len)
                        .map(|i| {
                            if i == 0 {
                                -100
                            } else {
                                rng.random_range(0..classes)
                            }
                        })
                        .collect(),
                ),
                _ => Target::Class(rng.random_range(0..classes)),
            };
            Example {
                task_id: None,
                token_type_ids: vec![0; ids.len()],
                input_ids: ids,
                target,
            }
        })
        .collect()
}

fn args(out: &Path) -> TrainingArguments {
    TrainingArguments {
        output_dir: out.to_path_buf(),
        learning_rate: 5e-3,
        weight_decay: 0.01,
        warmup_steps: 1,
        logging_steps: 1,
        save_strategy: Interval::No,
        seed: 5,
        ..Default::default()
    }
}

fn collate_opts(task: TaskType) -> CollateOptions {
    CollateOptions {
        task,
        pad_id: 0,
        padding_side: PaddingSide::Right,
        decoder_start_id: 0,
    }
}

fn adapter(m: &PeftModel) -> HashMap<String, Tensor> {
    m.adapter_state_dict("default")
        .unwrap()
        .into_iter()
        .collect()
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

fn run(
    m: &mut PeftModel,
    a: TrainingArguments,
    task: TaskType,
    train: &[Example],
    eval: Option<&[Example]>,
) -> peft::train::TrainReport {
    run_until(m, a, task, train, eval, StopSignal::new())
}

fn run_until(
    m: &mut PeftModel,
    a: TrainingArguments,
    task: TaskType,
    train: &[Example],
    eval: Option<&[Example]>,
    stop: StopSignal,
) -> peft::train::TrainReport {
    let mut t = Trainer {
        model: m,
        args: a,
        collate: collate_opts(task),
        train,
        eval,
        label_names: (0..5)
            .map(|i| ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"][i].to_string())
            .collect(),
        callback: None,
        stop,
        group: Default::default(),
    };
    let r = t.train().unwrap();
    if r.outcome == Outcome::Finished {
        let m = t.evaluate().unwrap();
        t.save_final(&r, m.as_ref()).unwrap();
    }
    r
}

#[test]
fn accumulating_k_micro_batches_equals_one_k_times_larger_batch() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, task, classes) in [
        ("seq_cls", TaskType::SeqCls, 3),
        ("token_cls", TaskType::TokenCls, 5),
    ] {
        let dir = without_dropout(name, tmp.path());
        let data = examples(task, 24, classes);
        let mut big = model(&dir, task, 0.0);
        let mut a = args(&tmp.path().join(format!("{name}-big")));
        a.per_device_train_batch_size = 8;
        a.max_steps = 3;
        run(&mut big, a.clone(), task, &data, None);
        let mut small = model(&dir, task, 0.0);
        a.output_dir = tmp.path().join(format!("{name}-acc"));
        a.per_device_train_batch_size = 2;
        a.gradient_accumulation_steps = 4;
        run(&mut small, a, task, &data, None);
        let fresh = adapter(&model(&dir, task, 0.0));
        let (b, s) = (adapter(&big), adapter(&small));
        assert!(
            max_diff(&b, &fresh) > 1e-3,
            "{name}: training changed the adapter"
        );
        let d = max_diff(&b, &s);
        assert!(d < 1e-5, "{name}: accumulated vs large batch differ by {d}");
    }
}

/// `gradient_checkpointing = true` trains the adapter the plain run trains, dropout included.
#[test]
fn gradient_checkpointing_trains_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_model("seq_cls");
    let data = examples(TaskType::SeqCls, 12, 3);
    let mut a = args(&tmp.path().join("plain"));
    a.per_device_train_batch_size = 4;
    a.max_steps = 3;
    let mut plain = model(&dir, TaskType::SeqCls, 0.1);
    run(&mut plain, a.clone(), TaskType::SeqCls, &data, None);
    let mut ckpt = model(&dir, TaskType::SeqCls, 0.1);
    a.output_dir = tmp.path().join("ckpt");
    a.gradient_checkpointing = true;
    run(&mut ckpt, a, TaskType::SeqCls, &data, None);
    let fresh = adapter(&model(&dir, TaskType::SeqCls, 0.1));
    let (p, c) = (adapter(&plain), adapter(&ckpt));
    assert!(max_diff(&p, &fresh) > 1e-3, "training changed the adapter");
    let d = max_diff(&p, &c);
    assert!(d < 1e-5, "checkpointed and plain runs differ by {d}");
}

#[test]
fn resumed_and_interrupted_runs_end_with_the_uninterrupted_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_model("seq_cls");
    let data = examples(TaskType::SeqCls, 10, 3);
    let eval = examples(TaskType::SeqCls, 6, 3);
    let mut a = args(&tmp.path().join("full"));
    a.per_device_train_batch_size = 4; // 3 micro-batches per epoch: steps 3 and 6 end epochs
    a.max_steps = 7;
    a.group_by_length = true;
    a.save_strategy = Interval::Steps;
    a.save_steps = 1;
    a.eval_strategy = Interval::Steps;
    a.eval_steps = Some(1);
    a.metric_for_best_model = Some("accuracy".into());
    a.lr_scheduler_type = peft::train::schedule::SchedulerType::Cosine;
    let mut full = model(&dir, TaskType::SeqCls, 0.1);
    let report = run(&mut full, a.clone(), TaskType::SeqCls, &data, Some(&eval));
    assert_eq!(report.steps, 7);
    let want = adapter(&full);

    // A run killed after checkpoint N: a fresh process resumes from the checkpoint it left.
    for n in [2, 3, 4, 6] {
        let out = tmp.path().join(format!("resumed-{n}"));
        std::fs::create_dir_all(&out).unwrap();
        let ck = a.output_dir.join(format!("checkpoint-{n}"));
        copy_dir(&ck, &out.join(format!("checkpoint-{n}")));
        let mut b = a.clone();
        b.output_dir = out;
        b.resume_from_checkpoint = Some("last".into());
        let mut m = model(&dir, TaskType::SeqCls, 0.1);
        let r = run(&mut m, b, TaskType::SeqCls, &data, Some(&eval));
        assert_eq!(r.steps, 7);
        let d = max_diff(&want, &adapter(&m));
        assert!(d < 1e-5, "resumed from checkpoint-{n}: differs by {d}");
    }

    // Ctrl-C: the flag makes the trainer save after the current step and stop.
    let out = tmp.path().join("interrupted");
    let mut c = a.clone();
    c.output_dir = out.clone();
    c.save_strategy = Interval::No;
    let mut m = model(&dir, TaskType::SeqCls, 0.1);
    let stop = StopSignal::new();
    stop.request(); // as the Ctrl-C handler does
    let r = run_until(
        &mut m,
        c.clone(),
        TaskType::SeqCls,
        &data,
        Some(&eval),
        stop,
    );
    assert_eq!(r.outcome, Outcome::Interrupted(out.join("checkpoint-1")));
    assert_eq!(r.steps, 1);
    c.resume_from_checkpoint = Some(out.join("checkpoint-1").display().to_string());
    let mut m = model(&dir, TaskType::SeqCls, 0.1);
    let r = run(&mut m, c, TaskType::SeqCls, &data, Some(&eval));
    assert_eq!((r.steps, r.outcome), (7, Outcome::Finished));
    let d = max_diff(&want, &adapter(&m));
    assert!(d < 1e-5, "resumed after Ctrl-C: differs by {d}");

    // What the full run left: checkpoints with every part, logs, curves, card, adapter.
    let full_dir = &a.output_dir;
    let ck = full_dir.join("checkpoint-4");
    for f in [
        "adapter_config.json",
        WEIGHTS_NAME,
        "optimizer.safetensors",
        "scheduler.json",
        "trainer_state.json",
    ] {
        assert!(ck.join(f).exists(), "checkpoint-4/{f}");
    }
    let state = peft::io::read_json(&ck.join("trainer_state.json")).unwrap();
    assert_eq!(state["global_step"], 4);
    assert_eq!(state["epochs_started"], 2);
    assert_eq!(state["micro_batch_in_epoch"], 1);
    assert!(state["dropout_draws"].as_u64().unwrap() > 0);
    let history = peft::train::trainer::read_history(&full_dir.join("metrics.jsonl"));
    assert_eq!(
        history.iter().filter(|h| h.get("loss").is_some()).count(),
        7
    );
    assert_eq!(
        history
            .iter()
            .filter(|h| h.get("eval_accuracy").is_some())
            .count(),
        7
    );
    for f in [
        "curves.png",
        "curves.svg",
        "README.md",
        WEIGHTS_NAME,
        "adapter_config.json",
    ] {
        assert!(full_dir.join(f).exists(), "{f}");
    }
    let png = std::fs::read(full_dir.join("curves.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let card = std::fs::read_to_string(full_dir.join("README.md")).unwrap();
    assert!(card.contains("library_name: peft") && card.contains("trainable params"));
    // No temporary checkpoint directory is left behind.
    assert!(std::fs::read_dir(full_dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
    // The best checkpoint survives rotation.
    let best = report.best_checkpoint.clone().unwrap();
    assert!(best.exists());
}

#[test]
fn save_total_limit_keeps_the_newest_and_the_best() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = without_dropout("seq_cls", tmp.path());
    let data = examples(TaskType::SeqCls, 8, 3);
    let mut a = args(&tmp.path().join("out"));
    a.per_device_train_batch_size = 4;
    a.max_steps = 6;
    a.save_strategy = Interval::Steps;
    a.save_steps = 1;
    a.eval_strategy = Interval::Steps;
    a.eval_steps = Some(1);
    a.save_total_limit = Some(2);
    a.load_best_model_at_end = true;
    let mut m = model(&dir, TaskType::SeqCls, 0.0);
    let r = run(&mut m, a.clone(), TaskType::SeqCls, &data, Some(&data));
    let best = r.best_checkpoint.unwrap();
    let left: Vec<PathBuf> = peft::train::checkpoint::list_checkpoints(&a.output_dir)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert!(left.contains(&best), "{left:?} lacks the best {best:?}");
    assert!(left.contains(&a.output_dir.join("checkpoint-6")));
    assert!(left.len() <= 3, "{left:?}");
    // load_best_model_at_end: the final adapter is the best checkpoint's.
    let saved =
        peft::io::load_safetensors(&best.join(WEIGHTS_NAME), &candle_core::Device::Cpu).unwrap();
    assert!(max_diff(&saved, &adapter(&m)) == 0.0);
}

#[test]
fn a_non_finite_loss_stops_the_run_and_names_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = without_dropout("seq_cls", tmp.path());
    let data = examples(TaskType::SeqCls, 8, 3);
    let mut a = args(&tmp.path().join("out"));
    a.learning_rate = 1e38;
    a.warmup_steps = 0;
    a.max_grad_norm = 0.0;
    a.per_device_train_batch_size = 4;
    a.max_steps = 10;
    a.save_strategy = Interval::Steps;
    a.save_steps = 1;
    let mut m = model(&dir, TaskType::SeqCls, 0.0);
    let mut t = Trainer {
        model: &mut m,
        args: a,
        collate: collate_opts(TaskType::SeqCls),
        train: &data,
        eval: None,
        label_names: vec![],
        callback: None,
        stop: StopSignal::new(),
        group: Default::default(),
    };
    let e = t.train().expect_err("the loss overflows").to_string();
    assert!(
        e.contains("the loss became") && e.contains("learning_rate"),
        "{e}"
    );
    assert!(e.contains("checkpoint-"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn mean_abs_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    let (mut sum, mut n) = (0f32, 0usize);
    for (k, t) in a {
        let d = (t - &b[k]).unwrap().abs().unwrap();
        sum += d.sum_all().unwrap().to_scalar::<f32>().unwrap();
        n += t.elem_count();
    }
    sum / n as f32
}

#[test]
fn bf16_computes_in_bf16_and_keeps_fp32_master_weights_and_moments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = without_dropout("seq_cls", tmp.path());
    let data = examples(TaskType::SeqCls, 16, 3);
    let mut a = args(&tmp.path().join("f32"));
    a.per_device_train_batch_size = 8;
    a.max_steps = 4;
    let mut full = model(&dir, TaskType::SeqCls, 0.0);
    let rf = run(&mut full, a.clone(), TaskType::SeqCls, &data, None);
    a.output_dir = tmp.path().join("bf16");
    a.bf16 = true;
    a.save_strategy = Interval::Steps;
    a.save_steps = 4;
    let mut half = model(&dir, TaskType::SeqCls, 0.0);
    let r = run(&mut half, a.clone(), TaskType::SeqCls, &data, None);
    assert!(r.final_loss.is_finite());
    // The bf16 products ran on the backend this CPU offers (the native kernel where it has
    // AVX512-BF16; tests/gemm_backends.rs checks every backend against an f64 product).
    eprintln!(
        "bf16 products on the {} gemm backend; final loss bf16 {} vs fp32 {}",
        peft::ops::gemm::bf16_backend().name(),
        r.final_loss,
        rf.final_loss
    );
    assert!(
        (r.final_loss - rf.final_loss).abs() <= 0.02 + 0.05 * rf.final_loss.abs(),
        "final loss bf16 {} vs fp32 {}",
        r.final_loss,
        rf.final_loss
    );
    let fresh = adapter(&model(&dir, TaskType::SeqCls, 0.0));
    let (f, h) = (adapter(&full), adapter(&half));
    assert!(
        h.values().all(|t| t.dtype() == candle_core::DType::F32),
        "fp32 master weights"
    );
    // bf16 rounding moves the result a little; training moves it a lot.
    let (moved, off) = (mean_abs_diff(&f, &fresh), mean_abs_diff(&f, &h));
    assert!(
        off < 0.2 * moved,
        "bf16 vs fp32 {off}, training moved {moved}"
    );
    let opt = peft::io::load_safetensors(
        &a.output_dir.join("checkpoint-4/optimizer.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(
        opt.values().all(|t| t.dtype() == candle_core::DType::F32),
        "fp32 moments"
    );
    if !peft::ops::gemm::bf16_is_native() {
        // No bf16 matrix instructions here: bf16 falls back to fp32, exactly.
        eprintln!("this CPU has no native bf16 products: checked the fp32 fallback instead");
        assert_eq!(r.final_loss, rf.final_loss);
        assert_eq!(max_diff(&f, &h), 0.0);
        return;
    }
    // As torch.autocast: the frozen linear weights are stored in bf16, while embeddings, norms
    // and biases stay f32, and so do the activations and the logits.
    use peft::layers::ModuleRef;
    let (mut bf16_linears, mut f32_others) = (0, 0);
    for m in half.base_model().modules() {
        match m {
            ModuleRef::Linear(l) if !l.weight.is_trainable() => {
                assert_eq!(
                    l.weight.value().dtype(),
                    candle_core::DType::BF16,
                    "{}",
                    l.name
                );
                bf16_linears += 1;
            }
            ModuleRef::Embedding(_) | ModuleRef::LayerNorm(_) => {
                for p in m.params() {
                    assert_eq!(p.value().dtype(), candle_core::DType::F32, "{}", p.name);
                }
                f32_others += 1;
            }
            _ => {}
        }
    }
    assert!(bf16_linears > 0 && f32_others > 0);
    let batch = peft::train::data::collate(
        &data[..4].iter().collect::<Vec<_>>(),
        &collate_opts(TaskType::SeqCls),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let logits = half.forward(&batch.inputs, false).unwrap();
    assert_eq!(logits.dtype(), candle_core::DType::F32);
    // The same weights widened back to f32 (exactly: every bf16 value is an f32 value): only
    // the inputs' rounding inside the bf16 products is left, and it moves the logits a little.
    half.cast_frozen(candle_core::DType::F32).unwrap();
    let want = half.forward(&batch.inputs, false).unwrap();
    let d = (&logits - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        d > 0.0 && d < 0.05 * scale.max(1.0),
        "bf16 vs f32 logits: {d} (scale {scale})"
    );
}

/// QUESTION_ANS (BERT), SEQ_2_SEQ_LM (T5) and CAUSAL_LM (Llama) go through the same loop: a few
/// steps on a small set lower its evaluation loss, and the task's metrics come out.
#[test]
fn every_task_trains_through_the_loop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            fixture_model("seq_cls"),
            TaskType::QuestionAns,
            vec!["query", "value"],
            "exact_match",
        ),
        (
            root.join("t5/t5_v1_0/model"),
            TaskType::Seq2SeqLm,
            vec!["q", "v"],
            "perplexity",
        ),
        (
            root.join("generation/tiny_llama"),
            TaskType::CausalLm,
            vec!["q_proj", "v_proj"],
            "perplexity",
        ),
    ];
    for (dir, task, targets, metric) in cases {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let vocab = if task == TaskType::Seq2SeqLm { 40 } else { 300 };
        let data: Vec<Example> = (0..8)
            .map(|i| {
                let len = 6 + i % 3;
                let ids: Vec<u32> = (0..len).map(|_| rng.random_range(3..vocab)).collect();
                let target = match task {
                    TaskType::QuestionAns => {
                        Target::Span(Box::new(peft::train::data::tasks::Span {
                            start: 2,
                            end: 3,
                            offsets: (0..len).map(|j| (j > 0).then_some((j, j + 1))).collect(),
                            context: "abcdefghij".into(),
                            answer: "bc".into(),
                        }))
                    }
                    TaskType::Seq2SeqLm => {
                        Target::Sequence(ids.iter().rev().take(4).copied().collect())
                    }
                    _ => Target::Tokens(ids.iter().map(|&x| x as i64).collect()),
                };
                Example {
                    task_id: None,
                    token_type_ids: vec![0; ids.len()],
                    input_ids: ids,
                    target,
                }
            })
            .collect();
        let opts = LoadOptions {
            task: Some(task),
            ..Default::default()
        };
        let config = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: Some(ModuleSpec::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            base: BaseFields {
                task_type: Some(task),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut m =
            get_peft_model_with_seed(models::load(&dir, &opts).unwrap(), config, "default", 0)
                .unwrap();
        let mut a = args(&tmp.path().join(task.as_str()));
        a.learning_rate = 2e-2;
        a.per_device_train_batch_size = 4;
        a.max_steps = 8;
        let eval_opts = peft::train::EvalOptions {
            collate: collate_opts(task),
            batch_size: 4,
            label_names: vec![],
            max_answer_length: 30,
        };
        let before = peft::train::evaluate(&m, &data, &eval_opts).unwrap();
        run(&mut m, a, task, &data, Some(&data));
        let after = peft::train::evaluate(&m, &data, &eval_opts).unwrap();
        assert!(
            after["loss"] < before["loss"],
            "{task:?}: {before:?} -> {after:?}"
        );
        assert!(after[metric].is_finite(), "{task:?}: {after:?}");
        if metric == "perplexity" {
            assert!((after["perplexity"].ln() - after["loss"]).abs() < 1e-9);
        }
    }
}

#[test]
fn bf16_falls_back_to_fp32_on_a_cpu_without_bf16_products() {
    // PEFT_GEMM=f32 makes this process's bf16 products widen to f32, as on a CPU without
    // AVX512-BF16 or AMX; the bf16 test above then checks the exact fp32 fallback.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "bf16_computes_in_bf16_and_keeps_fp32_master_weights_and_moments",
            "--nocapture",
        ])
        .env("PEFT_GEMM", "f32")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("checked the fp32 fallback") && text.contains("1 passed"),
        "{text}"
    );
}
