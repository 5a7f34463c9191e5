#!/usr/bin/env python3
"""Load generator for OpenAI-compatible completion servers (`peft serve`, llama.cpp's
llama-server), after vLLM's benchmark_serving: Poisson arrivals at a request rate, fixed prompt
and output lengths (prompts are random token ids, EOS ignored), adapters chosen per request
uniformly or with a power-law popularity. Streams every request and reports requests/s, output
tokens/s, time to first token (TTFT) and inter-token latency (ITL) at p50/p99, as one JSON line.

Standard library only. Examples:

  python3 tools/serve/loadgen.py --url http://127.0.0.1:8080 --adapters a0,a1,a2,a3 \
      --rate 4 --requests 64 --prompt-len 64 --output-len 32 --popularity uniform
  # llama-server: adapters are its --lora files, chosen per request by index
  python3 tools/serve/loadgen.py --url http://127.0.0.1:8081 --backend llamacpp --adapters 4 ...
"""

import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def one_request(url, body, headers, out):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    start = time.perf_counter()
    stamps = []
    tokens = 0
    err = None
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            err = f"HTTP {resp.status}: {resp.read()[:200]!r}"
        else:
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", tokens)
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
                    stamps.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - reported, not raised
        err = repr(e)
    finally:
        conn.close()
    end = time.perf_counter()
    out.append({"start": start, "end": end, "stamps": stamps, "tokens": tokens, "error": err})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--backend", choices=["openai", "llamacpp"], default="openai",
                    help="openai: the adapter goes in `model`; llamacpp: in `lora` by index")
    ap.add_argument("--model", default=None, help="model name for requests without adapters")
    ap.add_argument("--adapters", default="",
                    help="comma-separated adapter names (openai) or a count (llamacpp); empty: base")
    ap.add_argument("--popularity", choices=["uniform", "powerlaw"], default="uniform")
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent: p(i) ~ 1/(i+1)^alpha")
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=48000, help="prompt token ids are drawn below this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--label", default="", help="free text copied into the report")
    a = ap.parse_args()

    rng = random.Random(a.seed)
    if a.backend == "llamacpp":
        n = int(a.adapters or 0)
        names = list(range(n))
    else:
        names = [s for s in a.adapters.split(",") if s]
    weights = None
    if names and a.popularity == "powerlaw":
        weights = [1.0 / (i + 1) ** a.alpha for i in range(len(names))]
    headers = {"Content-Type": "application/json"}
    if a.api_key:
        headers["Authorization"] = f"Bearer {a.api_key}"

    results, threads, chosen = [], [], []
    t0 = time.perf_counter()
    next_at = t0
    for i in range(a.requests):
        prompt = [rng.randrange(100, a.vocab) for _ in range(a.prompt_len)]
        body = {"prompt": prompt, "max_tokens": a.output_len, "temperature": 0,
                "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        if names:
            pick = rng.choices(names, weights=weights)[0] if weights else rng.choice(names)
            chosen.append(pick)
            if a.backend == "llamacpp":
                body["model"] = a.model or "base"
                body["lora"] = [{"id": j, "scale": 1.0 if j == pick else 0.0} for j in names]
            else:
                body["model"] = pick
        else:
            body["model"] = a.model or "base"
        now = time.perf_counter()
        if next_at > now:
            time.sleep(next_at - now)
        th = threading.Thread(target=one_request, args=(a.url, body, headers, results))
        th.start()
        threads.append(th)
        next_at += rng.expovariate(a.rate)
    for th in threads:
        th.join()
    wall = max(r["end"] for r in results) - t0
    ok = [r for r in results if not r["error"]]
    ttft = [r["stamps"][0] - r["start"] for r in ok if r["stamps"]]
    itl = [b - a_ for r in ok for a_, b in zip(r["stamps"], r["stamps"][1:])]
    out_tokens = sum(r["tokens"] or len(r["stamps"]) for r in ok)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    report = {
        "label": a.label,
        "url": a.url,
        "backend": a.backend,
        "adapters": len(names),
        "popularity": a.popularity,
        "distinct_adapters_used": len(set(chosen)),
        "rate": a.rate,
        "requests": a.requests,
        "ok": len(ok),
        "errors": [r["error"] for r in results if r["error"]][:3],
        "prompt_len": a.prompt_len,
        "output_len": a.output_len,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1) if ttft else None,
        "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1) if ttft else None,
        "itl_p50_ms": round(1000 * percentile(itl, 50), 1) if itl else None,
        "itl_p99_ms": round(1000 * percentile(itl, 99), 1) if itl else None,
        "loadavg": load,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
