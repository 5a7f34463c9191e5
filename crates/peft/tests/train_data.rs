//! Data pipeline: readers (JSONL, CSV, Parquet), each task's examples and collator on inputs
//! small enough to work out by hand, and bad input. Token ids of the MiniLM tokenizer were read
//! off Python `tokenizers` (e.g. "Unaffable" → una ##ffa ##ble = 14477 20961 3468).

use candle_core::{Device, Tensor};
use peft::io::tokenizer::Tokenizer;
use peft::train::config::{DataSection, TrainConfig};
use peft::train::data::tasks::{align_word_labels, answer_tokens, pack, prompt_completion_ids};
use peft::train::data::{
    build_examples, collate, read_records, split_validation, CollateOptions, Example, LabelSet,
    PaddingSide, Target, Targets, TaskData,
};
use peft::TaskType;
use std::path::{Path, PathBuf};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_path(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/minilm_tokenizer/tokenizer.json"),
    )
    .unwrap()
}

fn data_section(extra: &str) -> DataSection {
    let text = format!(
        "[model]\npath = \"m\"\n[peft]\npeft_type = \"LORA\"\n[data]\ntrain_file = \"t.csv\"\n{extra}\n"
    );
    TrainConfig::from_toml_str(&text).unwrap().data
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn v2(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn ex(ids: &[u32], target: Target) -> Example {
    Example {
        task_id: None,
        input_ids: ids.to_vec(),
        token_type_ids: vec![0; ids.len()],
        target,
    }
}

fn opts(task: TaskType, side: PaddingSide) -> CollateOptions {
    CollateOptions {
        task,
        pad_id: 0,
        padding_side: side,
        decoder_start_id: 0,
    }
}

#[test]
fn readers_give_the_same_rows_from_jsonl_csv_and_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let j = write(
        tmp.path(),
        "a.jsonl",
        "{\"text\":\"good film\",\"label\":1}\n\n{\"text\":\"bad film\",\"label\":0}\n",
    );
    let c = write(
        tmp.path(),
        "a.csv",
        "text,label\ngood film,1\n\"bad film\",0\n",
    );
    let pq = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/rows.parquet");
    for (f, lines) in [(&j, [1, 3]), (&c, [2, 3]), (&pq, [1, 2])] {
        let rows = read_records(f).unwrap();
        assert!(rows.len() >= 2, "{}", f.display());
        assert_eq!(rows[0].text("text", f).unwrap(), "good film");
        assert_eq!(rows[1].text("label", f).unwrap(), "0");
        assert_eq!([rows[0].line, rows[1].line], lines, "{}", f.display());
    }
    let rows = read_records(&pq).unwrap();
    assert_eq!(rows[0].list("tokens", &pq).unwrap(), ["EU", "rejects"]);
    assert_eq!(rows[1].list("ner_tags", &pq).unwrap(), ["B-LOC"]);
    assert_eq!(rows[1].text("score", &pq).unwrap(), "-1.25");
    // CSV cells hold lists as JSON or as whitespace-separated words.
    let c2 = write(
        tmp.path(),
        "b.csv",
        "tokens,tags\n\"[\"\"a b\"\", \"\"c\"\"]\",O O\n",
    );
    let r = read_records(&c2).unwrap();
    assert_eq!(r[0].list("tokens", &c2).unwrap(), ["a b", "c"]);
    assert_eq!(r[0].list("tags", &c2).unwrap(), ["O", "O"]);
}

#[test]
fn validation_split_is_fixed_by_the_seed_and_disjoint() {
    let tmp = tempfile::tempdir().unwrap();
    let body: String = (0..50)
        .map(|i| format!("{{\"text\":\"t{i}\",\"label\":0}}\n"))
        .collect();
    let f = write(tmp.path(), "a.jsonl", &body);
    let lines = |v: &[peft::train::data::Record]| v.iter().map(|r| r.line).collect::<Vec<_>>();
    let (t1, e1) = split_validation(read_records(&f).unwrap(), 0.2, 7);
    let (t2, e2) = split_validation(read_records(&f).unwrap(), 0.2, 7);
    assert_eq!((lines(&t1), lines(&e1)), (lines(&t2), lines(&e2)));
    assert_eq!((t1.len(), e1.len()), (40, 10));
    assert!(e1.iter().all(|e| !t1.iter().any(|t| t.line == e.line)));
}

#[test]
fn seq_cls_examples_and_right_padding() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(
        tmp.path(),
        "a.csv",
        "text,label\ngood film,pos\nUnaffable,neg\n",
    );
    let d = data_section("");
    let labels = LabelSet::infer(None, &["pos".into(), "neg".into()], 2);
    assert_eq!(
        labels.names.as_deref(),
        Some(&["neg".to_string(), "pos".to_string()][..])
    );
    let spec = TaskData {
        task: TaskType::SeqCls,
        data: &d,
        labels: Some(&labels),
        eos_id: None,
    };
    let ex = build_examples(&spec, &read_records(&f).unwrap(), &f, &tokenizer()).unwrap();
    assert_eq!(ex[0].input_ids, [101, 2204, 2143, 102]);
    assert_eq!(ex[0].target, Target::Class(1));
    assert_eq!(ex[1].input_ids, [101, 14477, 20961, 3468, 102]);
    assert_eq!(ex[1].target, Target::Class(0));
    let b = collate(
        &[&ex[0], &ex[1]],
        &opts(TaskType::SeqCls, PaddingSide::Right),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        v2(b.inputs.input_ids.as_ref().unwrap()),
        [[101, 2204, 2143, 102, 0], [101, 14477, 20961, 3468, 102]]
    );
    assert_eq!(
        v2(b.inputs.attention_mask.as_ref().unwrap()),
        [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    );
    assert!(
        b.inputs.token_type_ids.is_none(),
        "all-zero segments are left to the model"
    );
    let Targets::Class(l) = &b.targets else {
        panic!()
    };
    assert_eq!(l.to_vec1::<i64>().unwrap(), [1, 0]);
    assert_eq!(b.num_targets, 2);
}

#[test]
fn token_cls_labels_go_to_the_first_sub_word() {
    // word_ids of [CLS] una ##ffa ##ble paris x [SEP].
    let words = [None, Some(0), Some(0), Some(0), Some(1), Some(2), None];
    assert_eq!(
        align_word_labels(&words, &[3, 1, 0]),
        [-100, 3, -100, -100, 1, 0, -100]
    );
    let tmp = tempfile::tempdir().unwrap();
    let f = write(
        tmp.path(),
        "a.jsonl",
        "{\"tokens\":[\"Unaffable\",\"Paris\",\"x\"],\"ner_tags\":[\"B-PER\",\"B-LOC\",\"O\"]}\n",
    );
    let d = data_section("");
    let labels = LabelSet::infer(None, &["B-PER".into(), "B-LOC".into(), "O".into()], 1);
    let spec = TaskData {
        task: TaskType::TokenCls,
        data: &d,
        labels: Some(&labels),
        eos_id: None,
    };
    let ex = build_examples(&spec, &read_records(&f).unwrap(), &f, &tokenizer()).unwrap();
    assert_eq!(ex[0].input_ids, [101, 14477, 20961, 3468, 3000, 1060, 102]);
    // Sorted names: B-LOC 0, B-PER 1, O 2.
    assert_eq!(
        ex[0].target,
        Target::Tokens(vec![-100, 1, -100, -100, 0, 2, -100])
    );
    let short = Example {
        task_id: None,
        input_ids: vec![101, 3000, 102],
        token_type_ids: vec![0; 3],
        target: Target::Tokens(vec![-100, 0, -100]),
    };
    let b = collate(
        &[&ex[0], &short],
        &opts(TaskType::TokenCls, PaddingSide::Right),
        &Device::Cpu,
    )
    .unwrap();
    let Targets::Tokens(l) = &b.targets else {
        panic!()
    };
    assert_eq!(
        v2(l),
        [
            [-100, 1, -100, -100, 0, 2, -100],
            [-100, 0, -100, -100, -100, -100, -100]
        ]
    );
    assert_eq!(b.num_targets, 4);
}

#[test]
fn causal_lm_packing_prompt_masking_and_left_padding() {
    assert_eq!(
        pack(&[1, 2, 3, 4, 5, 6, 7], 3),
        [vec![1, 2, 3], vec![4, 5, 6]]
    );
    assert_eq!(pack(&[1, 2], 3), [vec![1, 2]], "a lone short block is kept");
    let (ids, labels) = prompt_completion_ids(&[5, 6, 7], &[8, 9, 2], 5);
    assert_eq!(ids, [5, 6, 7, 8, 9]);
    assert_eq!(labels, [-100, -100, -100, 8, 9]);
    let a = ex(&[5, 6, 7, 8], Target::Tokens(vec![-100, -100, 7, 8]));
    let b = ex(&[9, 3], Target::Tokens(vec![-100, 3]));
    let batch = collate(
        &[&a, &b],
        &opts(TaskType::CausalLm, PaddingSide::Left),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        v2(batch.inputs.input_ids.as_ref().unwrap()),
        [[5, 6, 7, 8], [0, 0, 9, 3]]
    );
    assert_eq!(
        v2(batch.inputs.attention_mask.as_ref().unwrap()),
        [[1, 1, 1, 1], [0, 0, 1, 1]]
    );
    let Targets::Tokens(l) = &batch.targets else {
        panic!()
    };
    assert_eq!(v2(l), [[-100, -100, 7, 8], [-100, -100, -100, 3]]);
    // Labels predicted after the shift: 7, 8 and 3.
    assert_eq!(batch.num_targets, 3);
}

#[test]
fn seq2seq_decoder_inputs_are_the_labels_shifted_right() {
    let a = ex(&[4, 5, 1], Target::Sequence(vec![7, 8, 1]));
    let b = ex(&[6, 1], Target::Sequence(vec![9, 1]));
    let mut o = opts(TaskType::Seq2SeqLm, PaddingSide::Right);
    o.decoder_start_id = 0;
    let batch = collate(&[&a, &b], &o, &Device::Cpu).unwrap();
    assert_eq!(
        v2(batch.inputs.input_ids.as_ref().unwrap()),
        [[4, 5, 1], [6, 1, 0]]
    );
    assert_eq!(
        v2(batch.inputs.decoder_input_ids.as_ref().unwrap()),
        [[0, 7, 8], [0, 9, 0]]
    );
    let Targets::Tokens(l) = &batch.targets else {
        panic!()
    };
    assert_eq!(v2(l), [[7, 8, 1], [9, 1, -100]]);
    assert_eq!(batch.num_targets, 5);
}

#[test]
fn qa_answer_span_in_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(
        tmp.path(),
        "a.jsonl",
        "{\"question\":\"who lives in paris?\",\"context\":\"john lives in paris.\",\"answer\":\"paris\"}\n",
    );
    let d = data_section("");
    let spec = TaskData {
        task: TaskType::QuestionAns,
        data: &d,
        labels: None,
        eos_id: None,
    };
    let ex = build_examples(&spec, &read_records(&f).unwrap(), &f, &tokenizer()).unwrap();
    // [CLS] who lives in paris ? [SEP] john lives in paris . [SEP]: "paris" of the context is 10.
    let Target::Span(s) = &ex[0].target else {
        panic!()
    };
    assert_eq!((s.start, s.end), (10, 10));
    assert_eq!(
        ex[0].token_type_ids,
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    );
    // Context offsets (chars) john 0-4, lives 5-10, in 11-13, paris 14-19.
    let offs = [
        None,
        Some((0, 4)),
        Some((5, 10)),
        Some((11, 13)),
        Some((14, 19)),
        None,
    ];
    assert_eq!(answer_tokens(&offs, 5, 13), (2, 3));
    assert_eq!(
        answer_tokens(&offs, 14, 25),
        (0, 0),
        "cut off by truncation"
    );
    // Truncation keeps the question and cuts the context: the answer falls out.
    let d8 = data_section("max_length = 9");
    let spec8 = TaskData { data: &d8, ..spec };
    let ex8 = build_examples(&spec8, &read_records(&f).unwrap(), &f, &tokenizer()).unwrap();
    assert_eq!(ex8[0].input_ids.len(), 9);
    assert_eq!(
        &ex8[0].input_ids[..7],
        &[101, 2040, 3268, 1999, 3000, 1029, 102]
    );
    let Target::Span(s8) = &ex8[0].target else {
        panic!()
    };
    assert_eq!((s8.start, s8.end), (0, 0));
    let b = collate(
        &[&ex[0], &ex8[0]],
        &opts(TaskType::QuestionAns, PaddingSide::Left),
        &Device::Cpu,
    )
    .unwrap();
    let Targets::Span { start, end } = &b.targets else {
        panic!()
    };
    // Left padding moves the second example's positions right by 13 - 9 = 4.
    assert_eq!(start.to_vec1::<i64>().unwrap(), [10, 4]);
    assert_eq!(end.to_vec1::<i64>().unwrap(), [10, 4]);
}

fn err(r: peft::Result<impl std::fmt::Debug>) -> String {
    r.expect_err("an error").to_string()
}

#[test]
fn bad_input_names_the_file_line_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = write(tmp.path(), "empty.csv", "text,label\n");
    assert!(err(read_records(&empty)).contains("no examples"));
    let empty_j = write(tmp.path(), "empty.jsonl", "\n\n");
    assert!(err(read_records(&empty_j)).contains("no examples"));
    let bad = write(
        tmp.path(),
        "bad.jsonl",
        "{\"text\":\"a\",\"label\":0}\n{\"text\": oops}\n",
    );
    let e = err(read_records(&bad));
    assert!(e.contains("line 2") && e.contains("malformed JSON"), "{e}");
    let ragged = write(tmp.path(), "ragged.csv", "text,label\na,0\nb,1,extra\n");
    let e = err(read_records(&ragged));
    assert!(e.contains("line 3"), "{e}");
    let corrupt = write(tmp.path(), "x.parquet", "not parquet at all");
    assert!(err(read_records(&corrupt)).contains("not a readable Parquet"));
    let txt = write(tmp.path(), "x.txt", "hello");
    assert!(err(read_records(&txt)).contains(".jsonl, .csv or .parquet"));

    let d = data_section("");
    let missing = write(tmp.path(), "missing.csv", "sentence,label\nhi,1\n");
    let labels = LabelSet::infer(None, &["0".into(), "1".into()], 2);
    let spec = TaskData {
        task: TaskType::SeqCls,
        data: &d,
        labels: Some(&labels),
        eos_id: None,
    };
    let e = err(build_examples(
        &spec,
        &read_records(&missing).unwrap(),
        &missing,
        &tokenizer(),
    ));
    assert!(
        e.contains("`text`") && e.contains("sentence") && e.contains("line 2"),
        "{e}"
    );
    let range = write(tmp.path(), "range.csv", "text,label\na,0\nb,7\n");
    let e = err(build_examples(
        &spec,
        &read_records(&range).unwrap(),
        &range,
        &tokenizer(),
    ));
    assert!(e.contains("out of range") && e.contains("line 3"), "{e}");
    let named = LabelSet::infer(None, &["neg".into(), "pos".into()], 2);
    let spec_n = TaskData {
        labels: Some(&named),
        ..spec
    };
    let unknown = write(tmp.path(), "unknown.csv", "text,label\na,pos\nb,meh\n");
    let e = err(build_examples(
        &spec_n,
        &read_records(&unknown).unwrap(),
        &unknown,
        &tokenizer(),
    ));
    assert!(
        e.contains("`meh`") && e.contains("not in the label set") && e.contains("line 3"),
        "{e}"
    );

    let tags = LabelSet::infer(None, &["O".into()], 1);
    let spec_t = TaskData {
        task: TaskType::TokenCls,
        labels: Some(&tags),
        ..spec
    };
    let uneven = write(
        tmp.path(),
        "u.jsonl",
        "{\"tokens\":[\"a\",\"b\"],\"ner_tags\":[\"O\"]}\n",
    );
    let e = err(build_examples(
        &spec_t,
        &read_records(&uneven).unwrap(),
        &uneven,
        &tokenizer(),
    ));
    assert!(
        e.contains("2 words but 1 tags") && e.contains("line 1"),
        "{e}"
    );

    let spec_q = TaskData {
        task: TaskType::QuestionAns,
        labels: None,
        ..spec
    };
    let qa = write(
        tmp.path(),
        "q.jsonl",
        "{\"question\":\"q\",\"context\":\"c\",\"answer\":\"zz\"}\n",
    );
    let e = err(build_examples(
        &spec_q,
        &read_records(&qa).unwrap(),
        &qa,
        &tokenizer(),
    ));
    assert!(
        e.contains("does not occur in the context") && e.contains("line 1"),
        "{e}"
    );

    let d_pc = data_section("prompt_column = \"prompt\"\nmax_length = 3");
    let spec_c = TaskData {
        task: TaskType::CausalLm,
        data: &d_pc,
        labels: None,
        eos_id: Some(102),
    };
    let long = write(
        tmp.path(),
        "p.jsonl",
        "{\"prompt\":\"good film good film\",\"completion\":\"yes\"}\n",
    );
    let e = err(build_examples(
        &spec_c,
        &read_records(&long).unwrap(),
        &long,
        &tokenizer(),
    ));
    assert!(e.contains("prompt alone fills max_length"), "{e}");
}

#[test]
fn config_overrides_and_unknown_keys() {
    let base = "[model]\npath = \"m\"\n[peft]\npeft_type = \"LORA\"\n[data]\ntrain_file = \"t.csv\"\n[training]\nlearning_rate = 1e-3\n";
    let c = TrainConfig::from_toml_str_with(
        base,
        &[
            "training.learning_rate=1e-4".into(),
            "training.lr_scheduler_type=cosine".into(),
            "training.gradient_accumulation_steps=4".into(),
            "data.eval_file=ev.jsonl".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.training.learning_rate, 1e-4);
    assert_eq!(c.training.gradient_accumulation_steps, 4);
    assert_eq!(c.data.eval_file.as_deref(), Some(Path::new("ev.jsonl")));
    let e = err(TrainConfig::from_toml_str_with(
        base,
        &["training.lerning_rate=1".into()],
    ));
    assert!(
        e.contains("`lerning_rate`") && e.contains("did you mean `learning_rate`"),
        "{e}"
    );
    let e = err(TrainConfig::from_toml_str(
        &base.replace("learning_rate", "warmup_ration"),
    ));
    assert!(e.contains("did you mean `warmup_ratio`"), "{e}");
    let e = err(TrainConfig::from_toml_str(
        &base.replace("[data]", "[data]\ntext_colum = \"x\""),
    ));
    assert!(e.contains("did you mean `text_column`"), "{e}");
    let e = err(TrainConfig::from_toml_str_with(
        base,
        &["trainig.seed=1".into()],
    ));
    assert!(e.contains("did you mean `training`"), "{e}");
    let e = err(TrainConfig::from_toml_str_with(base, &["seed".into()]));
    assert!(e.contains("table.key=value"), "{e}");
    let e = err(TrainConfig::from_toml_str_with(
        base,
        &["training.load_best_model_at_end=true".into()],
    ));
    assert!(e.contains("eval_strategy"), "{e}");
}
