"""How much prefill vLLM's prefix cache saves for R³L retries.

    python benchmarks/prefix_cache.py [--model smollm2-135m-instruct] [--prompts 8] [--prefix 1024] [--suffix 48]

A retry restarts from a prefix of the base trajectory (token for token) plus a short new part (the
reflection's guidance). This sends ``--prompts`` base prompts of ``--prefix`` tokens, then their
retries (``base + --suffix`` new tokens), each with one new token to generate (≈ pure prefill):

- cold: the retries after ``reset_prefix_cache()`` (what happens without prefix caching, or after a
  weight sync, which must drop the cache);
- warm: the retries right after their bases (the cache holds the shared prefix);
- unrelated: prompts of the same length that share nothing but the chat-template head.

Prints wall times, vLLM's per-request cached-token counts (``RequestOutput.num_cached_tokens``) and
the fraction of prefill tokens served from the cache.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.engines.vllm import VLLMEngine
from r3l_lightning.models import eos_token_ids, load_policy, load_tokenizer


def run(llm, prompts: list[list[int]]) -> tuple[float, int, int]:
    import vllm

    params = vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    cached = sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in outputs)
    return elapsed, cached, sum(map(len, prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=1024, help="tokens shared by a base and its retry")
    parser.add_argument("--suffix", type=int, default=48, help="new tokens of the retry")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}; cpus: {os.cpu_count()}")

    tokenizer, policy = load_tokenizer(args.model), load_policy(args.model)
    vocab = len(tokenizer)
    rng = random.Random(0)
    head = tokenizer.apply_chat_template([{"role": "user", "content": "Solve the task."}], tokenize=True,
                                         add_generation_prompt=False, return_dict=False)

    def body(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    bases = [head + body(args.prefix - len(head)) for _ in range(args.prompts)]
    retries = [b + body(args.suffix) for b in bases]
    unrelated = [head + body(len(r) - len(head)) for r in retries]

    engine = VLLMEngine(kv_cache_gib=2, max_model_len=args.prefix + args.suffix + 64, enable_prefix_caching=True)
    engine.bind(policy, tokenizer, eos_token_ids(policy, tokenizer))
    engine.generate([head], SamplingParams(temperature=0.0, max_new_tokens=2))  # start-up + warm-up
    llm = engine.llm

    rows = []
    llm.reset_prefix_cache()
    run(llm, bases)
    llm.reset_prefix_cache()
    rows.append(("retries, cold cache", *run(llm, retries)))
    llm.reset_prefix_cache()
    run(llm, bases)
    rows.append(("retries after their bases", *run(llm, retries)))
    llm.reset_prefix_cache()
    run(llm, bases)
    rows.append(("unrelated prompts", *run(llm, unrelated)))
    engine.close()

    print(f"{args.prompts} prompts; base {args.prefix} tokens, retry = base + {args.suffix} tokens; 1 new token each")
    for label, seconds, cached, total in rows:
        print(f"{label:28s} {seconds:6.2f} s  prefill {total / seconds:7.0f} tokens/s  "
              f"cached {cached}/{total} tokens ({cached / total:.1%})")
    cold, warm = rows[0][1], rows[1][1]
    print(f"prefix cache saves {1 - warm / cold:.1%} of the retries' prefill time (x{cold / warm:.1f}); "
          f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
