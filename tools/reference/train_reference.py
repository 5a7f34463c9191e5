"""Reference run of the default recipe with PyTorch + transformers + PEFT.

Fine-tunes all-MiniLM-L6-v2 (BertForSequenceClassification, 2 labels, randomly initialised
classifier on top of the pretrained pooler) with LoRA on rotten_tomatoes and reports test accuracy,
training wall time and peak RSS. These are the numbers the Rust `peft train` default recipe is
compared against.

Recipe (transformers Trainer):
  * tokenizer: AutoTokenizer from the model dir, truncation at 128 tokens, dynamic padding
    (DataCollatorWithPadding);
  * LoRA: task_type=SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query","value"]
    (74,498 trainable parameters: LoRA A/B on 6 layers x {query,value} + the classifier, which
    PEFT adds to modules_to_save for SEQ_CLS);
  * the Trainer's default optimizer (torch AdamW, fused=True on torch >= 2.8; betas 0.9/0.999, eps 1e-8), lr 1e-3,
    weight_decay 0.01 on weights only (the Trainer exempts biases and LayerNorm), linear schedule
    with 6% warmup (ceil(0.06 * total steps)), batch 16 train / 64 eval, 3 epochs, seed 42, fp32,
    CPU.

Run from the repository root, after scripts/fetch-assets.sh has prepared .assets/:

    python tools/reference/train_reference.py [--epochs 3] [--lr 1e-3] [--seed 42] [--threads 2]

Optional: --group-by-length (Trainer's LengthGroupedSampler, as in
examples/minilm-rotten-tomatoes.toml), --max-length N (default 128), --model DIR, --data DIR
(holding train.csv and test.csv with columns text,label), --max-steps N, --peft-config FILE
(tools/reference/methods/*.json), --save DIR (save_pretrained, reports adapter_bytes), --json (also
print the summary as one JSON line at the end, with examples_per_s = steps x 16 / train seconds).
"""

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from peft import LoraConfig, get_peft_config, get_peft_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def busy_jiffies():
    """Busy CPU time of the whole machine from /proc/stat (seconds), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def other_load(t_wall, busy0, cpu0):
    """Mean number of cores that other processes kept busy since (busy0, cpu0), over t_wall s.

    Near 0 on a quiet machine; on the 2-core machine anything above ~0.3 makes the timings of a
    2-thread OpenMP run unreliable (threads wait at barriers for a descheduled peer).
    """
    busy1 = busy_jiffies()
    if busy0 is None or busy1 is None:
        return None
    own = time.process_time() - cpu0
    return round(max(0.0, (busy1 - busy0) - own) / t_wall, 2)


def read_csv(path):
    """Rows of a text,label CSV as (texts, labels)."""
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return texts, labels


class Encoded(torch.utils.data.Dataset):
    """Tokenized examples (unpadded) as the dicts DataCollatorWithPadding expects."""

    def __init__(self, tokenizer, texts, labels, max_length):
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.items = [
            {"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], labels)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def peak_rss_mb():
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def describe_optimizer(opt):
    """'AdamW(fused=True)' for the torch optimizer under accelerate's wrapper."""
    opt = getattr(opt, "optimizer", opt)
    return f"{type(opt).__name__}(fused={opt.defaults.get('fused')})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch examples of similar length together (Trainer's LengthGroupedSampler)",
    )
    p.add_argument("--model", default=os.path.join(ROOT, ".assets", "all-MiniLM-L6-v2"))
    p.add_argument("--data", default=os.path.join(ROOT, ".assets", "rotten_tomatoes"))
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    p.add_argument("--save", help="save the trained adapter (save_pretrained) here, for its file size")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (as max_steps)")
    p.add_argument(
        "--peft-config",
        help="a PEFT config JSON (tools/reference/methods/*.json) instead of LoRA r=8 q/v; AdaLoRA's "
        "update_and_allocate then runs after every optimizer step, as PEFT's docs prescribe",
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_texts, train_labels = read_csv(os.path.join(args.data, "train.csv"))
    test_texts, test_labels = read_csv(os.path.join(args.data, "test.csv"))
    train_ds = Encoded(tokenizer, train_texts, train_labels, args.max_length)
    test_ds = Encoded(tokenizer, test_texts, test_labels, args.max_length)
    print(f"train {len(train_ds)} examples, test {len(test_ds)} examples", flush=True)

    # Seed before building the model so that the classifier's random init (and the LoRA A init)
    # follows --seed; the Trainer seeds again (same seed) for shuffling and dropout.
    set_seed(args.seed)
    model = BertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    if args.peft_config:
        with open(args.peft_config, encoding="utf-8") as f:
            lora = get_peft_config(json.load(f))
    else:
        lora = LoraConfig(
            task_type="SEQ_CLS",
            r=8,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=["query", "value"],
        )
    model = get_peft_model(model, lora)
    callbacks = []
    if lora.peft_type == "ADALORA":

        class AdaLoraAllocate(TrainerCallback):
            def on_optimizer_step(self, targs, state, control, **kwargs):
                model.base_model.update_and_allocate(state.global_step)

        callbacks.append(AdaLoraAllocate())
    model.print_trainable_parameters()

    def compute_metrics(pred):
        logits, labels = pred
        return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

    with tempfile.TemporaryDirectory() as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir,
            learning_rate=args.lr,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=64,
            warmup_steps=0.06,  # a float < 1 is a ratio of the total steps (transformers 5 dropped warmup_ratio)
            lr_scheduler_type="linear",
            weight_decay=0.01,
            seed=args.seed,
            logging_steps=50,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            use_cpu=True,
            train_sampling_strategy="group_by_length" if args.group_by_length else "random",
            disable_tqdm=True,  # plain log lines (loss every 50 steps) instead of progress bars
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=train_ds,
            eval_dataset=test_ds,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_metrics,
            callbacks=callbacks,
        )
        busy0, cpu0 = busy_jiffies(), time.process_time()
        t0 = time.perf_counter()
        train_out = trainer.train()
        train_s = time.perf_counter() - t0
        other = other_load(train_s, busy0, cpu0)
        t0 = time.perf_counter()
        metrics = trainer.evaluate()
        eval_s = time.perf_counter() - t0
    saved_bytes = None
    if args.save:
        model.save_pretrained(args.save)
        saved_bytes = os.path.getsize(os.path.join(args.save, "adapter_model.safetensors"))

    summary = {
        "impl": "pytorch+peft",
        "epochs": args.epochs,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "group_by_length": args.group_by_length,
        "steps": train_out.global_step,
        "train_loss": round(train_out.training_loss, 4),
        "test_accuracy": round(metrics["eval_accuracy"], 4),
        "test_loss": round(metrics["eval_loss"], 4),
        "train_s": round(train_s, 1),
        "examples_per_s": round(train_out.global_step * 16 / train_s, 2),
        "adapter_bytes": saved_bytes,
        "eval_s": round(eval_s, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "optimizer": describe_optimizer(trainer.optimizer),
        "other_load": other,
    }
    print(f"test accuracy: {summary['test_accuracy']:.4f} ({len(test_ds)} examples)")
    print(f"train wall time: {train_s:.1f} s ({train_out.global_step} steps, {args.epochs:g} epochs)")
    print(f"eval wall time: {eval_s:.1f} s")
    print(f"peak RSS: {summary['peak_rss_mb']:.0f} MiB")
    print(f"other processes kept {other} cores busy on average during training")
    if args.json:
        print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
