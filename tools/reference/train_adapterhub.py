"""The AdapterHub side of the bottleneck-adapter measurements: trains with `adapters` 1.3.0 and
its AdapterTrainer what `peft train` trains with the configs in examples/ (all-MiniLM-L6-v2,
Rotten Tomatoes fresh/rotten), and reports test accuracy, training throughput and peak RSS.

Needs the second venv (adapters 1.3.0, transformers 4.57.6; tools/fixtures/README.md) and the
assets of scripts/fetch-assets.sh. Run from the repository root:

    /tmp/pyenv-ah/bin/python tools/reference/train_adapterhub.py --method seq_bn
    /tmp/pyenv-ah/bin/python tools/reference/train_adapterhub.py --method double_seq_bn
    /tmp/pyenv-ah/bin/python tools/reference/train_adapterhub.py --method lora
    # a second adapter on another labelling of the same reviews, then Fuse(sentiment, length):
    /tmp/pyenv-ah/bin/python tools/reference/train_adapterhub.py --method seq_bn \\
        --train /tmp/rt/len_train.csv --test /tmp/rt/len_test.csv --save /tmp/ah-len
    /tmp/pyenv-ah/bin/python tools/reference/train_adapterhub.py --method seq_bn --save /tmp/ah-rt
    /tmp/pyenv-ah/bin/python tools/reference/train_adapterhub.py --method fusion \\
        --fuse /tmp/ah-rt /tmp/ah-len
    # AdapterDrop at inference: accuracy and eval time skipping the first k layers' adapters
    /tmp/pyenv-ah/bin/python tools/reference/train_adapterhub.py --method skip --load /tmp/ah-rt

Recipe (the same as examples/minilm-rotten-tomatoes-{pfeiffer,houlsby}.toml and the LoRA
example): AutoAdapterModel with a classification head (2 layers, tanh, first token — AdapterHub's
default `add_classification_head`), `train_adapter` (only the adapter and head train; LoRA: r 8,
alpha 16, dropout 0.1 on query/value, AdapterHub's LoRAConfig), AdamW lr 1e-3, weight decay 0.01,
linear schedule with 6% warmup, batch 16 train / 64 eval, truncation at 128, dynamic padding,
seed 42, fp32 on the CPU with --threads threads. `--method fusion` loads the adapters saved by two
earlier runs (`--save`), adds `Fuse(a, b)` (dynamic) with a new head and trains it with
`train_adapter_fusion` (AdapterTrainer adds the fusion regularisation each step). `--method skip`
evaluates a saved adapter with `skip_layers = [0..k)` for k = 0..5.

Prints one JSON line: method, examples, steps, train seconds, examples/s, seconds per step, test
accuracy, peak RSS (MiB), and the 1/5/15-minute load averages at the start and end.
"""

import argparse
import csv
import json
import os
import resource
import sys
import time

import numpy as np
import torch

import adapters  # noqa: F401
from adapters import AdapterTrainer, AutoAdapterModel, Fuse, LoRAConfig
from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments, set_seed

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def read(path):
    with open(path, newline="") as f:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(f)]


class Data(torch.utils.data.Dataset):
    def __init__(self, rows, tok, max_length):
        self.items = []
        for text, label in rows:
            enc = tok(text, truncation=True, max_length=max_length)
            self.items.append({**enc, "labels": label})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def accuracy(model, data, collate, batch):
    model.eval()
    correct = 0
    loader = torch.utils.data.DataLoader(data, batch_size=batch, collate_fn=collate)
    start = time.perf_counter()
    with torch.no_grad():
        for b in loader:
            labels = b.pop("labels")
            logits = model(**b).logits
            correct += (logits.argmax(-1) == labels).sum().item()
    return correct / len(data), time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True, choices=["seq_bn", "double_seq_bn", "lora", "fusion", "skip"])
    p.add_argument("--model", default=os.path.join(ROOT, ".assets/all-MiniLM-L6-v2"))
    p.add_argument("--train", default="/tmp/rt/train.csv")
    p.add_argument("--test", default="/tmp/rt/test.csv")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", help="save the trained adapter (with its head) here")
    p.add_argument("--fuse", nargs=2, help="two saved adapter directories to fuse")
    p.add_argument("--load", help="--method skip: the saved adapter to evaluate")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    set_seed(42)
    load_start = os.getloadavg()
    tok = AutoTokenizer.from_pretrained(a.model)
    collate = DataCollatorWithPadding(tok)
    train = Data(read(a.train), tok, 128)
    test = Data(read(a.test), tok, 128)
    model = AutoAdapterModel.from_pretrained(a.model)
    name = "rt"
    if a.method == "skip":
        name = model.load_adapter(a.load, set_active=True)
        rows = []
        for k in range(6):
            model.set_active_adapters(name, skip_layers=list(range(k)) or None)
            acc, secs = accuracy(model, test, collate, 64)
            rows.append({"skip_first": k, "accuracy": round(acc, 4), "eval_seconds": round(secs, 2)})
        print(json.dumps({"method": "adapterhub_skip", "rows": rows, "load_start": load_start,
                          "load_end": os.getloadavg()}))
        return
    if a.method == "fusion":
        names = [model.load_adapter(d, with_head=False) for d in a.fuse]
        model.add_adapter_fusion(Fuse(*names), "dynamic")
        name = ",".join(names)
        model.add_classification_head(name, num_labels=2)
        model.train_adapter_fusion(Fuse(*names))
    else:
        config = {
            "seq_bn": "seq_bn",
            "double_seq_bn": "double_seq_bn",
            "lora": LoRAConfig(r=8, alpha=16, dropout=0.1),
        }[a.method]
        model.add_adapter(name, config=config)
        model.add_classification_head(name, num_labels=2)
        model.train_adapter(name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = TrainingArguments(
        output_dir="/tmp/ah-train-out",
        learning_rate=a.lr,
        num_train_epochs=a.epochs,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        warmup_ratio=0.06,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        seed=42,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = AdapterTrainer(model=model, args=args, train_dataset=train, data_collator=collate)
    start = time.perf_counter()
    out = trainer.train()
    secs = time.perf_counter() - start
    acc, eval_secs = accuracy(model, test, collate, 64)
    if a.save:
        if a.method == "fusion":
            model.save_adapter_fusion(a.save, name, with_head=True)
        else:
            model.save_adapter(a.save, name)
    steps = out.global_step
    print(json.dumps({
        "method": f"adapterhub_{a.method}",
        "trainable_params": trainable,
        "examples": len(train),
        "steps": steps,
        "train_seconds": round(secs, 1),
        "examples_per_second": round(len(train) * a.epochs / secs, 2),
        "seconds_per_step": round(secs / max(steps, 1), 3),
        "test_accuracy": round(acc, 4),
        "eval_seconds": round(eval_secs, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_start": load_start,
        "load_end": os.getloadavg(),
    }))


if __name__ == "__main__":
    sys.exit(main())
