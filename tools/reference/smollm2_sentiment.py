"""SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized to fp32 by transformers) learns Rotten Tomatoes sentiment as a
causal LM with prompt tuning, PyTorch + PEFT: the twin of `cargo run --release -p peft --example smollm2_sentiment`.

    python tools/reference/smollm2_sentiment.py [--steps 60] [--batch 8] [--lr 3e-2] [--eval 200] [--threads 2]

Recipe (the same on both sides): each training example is "Review: {text}\\nSentiment:" followed by " positive" or
" negative" and the EOS token, the loss on the completion only; the first steps x batch reviews of
.assets/rotten_tomatoes/train.csv in a fixed shuffled order (seed 42), truncated to 96 tokens; prompt tuning with 20
virtual tokens, TEXT init from "Classify the sentiment of this review as positive or negative:" (the GGUF's
tokenizer); transformers' Trainer: AdamW (weight decay 0), linear schedule, no warmup, gradient clipping at 1.0,
batch --batch, --steps steps, fp32, CPU. Accuracy on the first --eval reviews of test.csv: the model's next-token
logit for " positive" against " negative" after the prompt (batches of 16, left padding). Prints one JSON line:
accuracy, seconds per training step, training seconds, peak RSS, the machine's load.
"""

import argparse
import csv
import json
import os
import random
import resource
import sys
import time
import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from peft import PromptTuningConfig, get_peft_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TEMPLATE = "Review: {}\nSentiment:"
INIT = "Classify the sentiment of this review as positive or negative:"
MAX_LEN = 96


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["text"], int(r["label"])) for r in csv.DictReader(f)]


class Examples(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gguf", default=os.path.join(ROOT, ".assets", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    torch.manual_seed(42)
    d, f = os.path.dirname(args.gguf), os.path.basename(args.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # transformers 5 dequantizes the GGUF to plain fp32 tensors on load but keeps its GGUF quantizer on the model, and
    # the Trainer then refuses to train it ("QuantizationMethod.GGUF ... do not support training"). The weights are
    # ordinary fp32 parameters, so drop the marker.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=INIT, tokenizer_name_or_path=d,
                                tokenizer_kwargs={"gguf_file": f})
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    train = rows(os.path.join(ROOT, ".assets", "rotten_tomatoes", "train.csv"))
    random.Random(42).shuffle(train)
    train = train[: args.steps * args.batch]
    words = {1: " positive", 0: " negative"}
    items = []
    for text, label in train:
        prompt = tok(TEMPLATE.format(text))["input_ids"]
        completion = tok(words[label], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + completion)[:MAX_LEN]
        labels = ([-100] * len(prompt) + completion)[:MAX_LEN]
        items.append({"input_ids": ids, "labels": labels})

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch])
        mask = torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch])
        labels = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    targs = TrainingArguments(output_dir="/tmp/smollm2-sentiment-torch", max_steps=args.steps,
                              per_device_train_batch_size=args.batch, learning_rate=args.lr, weight_decay=0.0,
                              lr_scheduler_type="linear", warmup_steps=0, logging_steps=10, save_strategy="no",
                              report_to=[], seed=42, use_cpu=True, dataloader_drop_last=False)
    trainer = Trainer(model=model, args=targs, train_dataset=Examples(items), data_collator=collate)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0

    model.eval()
    pos = tok(" positive", add_special_tokens=False)["input_ids"][0]
    neg = tok(" negative", add_special_tokens=False)["input_ids"][0]
    test = rows(os.path.join(ROOT, ".assets", "rotten_tomatoes", "test.csv"))[: args.eval]
    right = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        for i in range(0, len(test), 16):
            chunk = test[i : i + 16]
            enc = [tok(TEMPLATE.format(t))["input_ids"][:MAX_LEN] for t, _ in chunk]
            width = max(len(e) for e in enc)
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1, :]
            pred = (logits[:, pos] > logits[:, neg]).long().tolist()
            right += sum(int(pr == lab) for pr, (_, lab) in zip(pred, chunk))
    print(json.dumps({
        "impl": "pytorch+peft",
        "accuracy": round(right / len(test), 4),
        "eval_reviews": len(test),
        "steps": args.steps,
        "batch": args.batch,
        "seconds_per_step": round(train_s / args.steps, 3),
        "train_seconds": round(train_s, 1),
        "final_loss": round(out.training_loss, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
        "threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
