#!/usr/bin/env python3
"""Checks a running `peft serve` with the official `openai` Python client (not part of CI).

  pip install openai
  # a causal LM with an adapter named `a` (any adapter works; the API key is optional):
  peft serve --model crates/peft/tests/fixtures/generation/tiny_llama --served-model-name tiny \
      --adapter a=ADAPTER_DIR --api-key k --port 8080 &
  python3 tools/serve/openai_client_check.py --base-url http://127.0.0.1:8080/v1 \
      --api-key k --model tiny --adapter a
  # an encoder (embeddings):
  peft serve --model .assets/all-MiniLM-L6-v2 --served-model-name minilm --port 8081 &
  python3 tools/serve/openai_client_check.py --base-url http://127.0.0.1:8081/v1 \
      --embedding-model minilm

Prints one line per check and exits non-zero on the first failure.
"""

import argparse
import sys

import openai


# A short system message keeps the prompt inside small test models' context windows.
MSGS = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + (f": {detail}" if detail else ""))
    if not cond:
        sys.exit(1)


def generation(client, model, adapter):
    models = [m.id for m in client.models.list()]
    check("models.list names the base and the adapter", model in models and adapter in models, str(models))
    parent = {m.id: getattr(m, "parent", None) for m in client.models.list()}
    check("the adapter's parent is the base", parent.get(adapter) == model, str(parent))

    for who in (model, adapter):
        r = client.completions.create(model=who, prompt="hello world", max_tokens=8, temperature=0)
        text = r.choices[0].text
        check(f"completions ({who})", r.object == "text_completion" and r.usage.completion_tokens > 0,
              repr(text))
        parts, usage = [], None
        for chunk in client.completions.create(model=who, prompt="hello world", max_tokens=8,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices:
                parts.append(chunk.choices[0].text)
            if chunk.usage:
                usage = chunk.usage
        check(f"streamed completion equals the plain one ({who})", "".join(parts) == text,
              repr("".join(parts)))
        check(f"usage in the last chunk ({who})", usage is not None and usage.completion_tokens == r.usage.completion_tokens)

    r = client.chat.completions.create(model=adapter, messages=MSGS,
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    msg = r.choices[0].message
    check("chat.completions", msg.role == "assistant" and r.choices[0].finish_reason in ("stop", "length"),
          repr(msg.content))
    lps = r.choices[0].logprobs.content
    check("chat logprobs with top_logprobs", len(lps) > 0 and len(lps[0].top_logprobs) == 2)
    parts = []
    for chunk in client.chat.completions.create(model=adapter, messages=MSGS,
                                                max_tokens=8, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    check("streamed chat equals the plain one", "".join(parts) == msg.content, repr("".join(parts)))

    r = client.completions.create(model=adapter, prompt="hello", max_tokens=4, temperature=0, n=2, logprobs=1)
    check("n=2 with logprobs", len(r.choices) == 2 and r.choices[0].logprobs.tokens is not None)

    try:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
        check("unknown model raises NotFoundError", False)
    except openai.NotFoundError as e:
        check("unknown model raises NotFoundError", "no-such-adapter" in str(e), str(e)[:120])
    try:
        client.completions.create(model=adapter, prompt="x", max_tokens=10**6)
        check("max_tokens too large raises BadRequestError", False)
    except openai.BadRequestError as e:
        check("max_tokens too large raises BadRequestError", True, str(e)[:120])


def embeddings(client, model):
    r = client.embeddings.create(model=model, input=["a fine film", "a dull film"])
    check("embeddings (float through the client's base64)", len(r.data) == 2 and len(r.data[0].embedding) > 0,
          f"dim {len(r.data[0].embedding)}")
    norm = sum(x * x for x in r.data[0].embedding) ** 0.5
    check("normalised as the model's sentence-transformers config says", abs(norm - 1) < 1e-3, f"norm {norm:.5f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", help="the base model's served name (causal LM)")
    ap.add_argument("--adapter", help="an adapter's name (causal LM)")
    ap.add_argument("--embedding-model", help="an encoder's served name")
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key)
    print(f"openai {openai.__version__} against {a.base_url}")
    if a.api_key != "none":
        bad = openai.OpenAI(base_url=a.base_url, api_key="wrong")
        try:
            bad.models.list()
            check("a wrong API key raises AuthenticationError", False)
        except openai.AuthenticationError:
            check("a wrong API key raises AuthenticationError", True)
    if a.model and a.adapter:
        generation(client, a.model, a.adapter)
    if a.embedding_model:
        embeddings(client, a.embedding_model)
    print("all checks passed")


if __name__ == "__main__":
    main()
