"""End-to-end CPU speed: transformers eager vs the lowered moepass program (as it is, and through
torch.compile) vs onnxruntime (exact, and with int8 activations in its quantized matmuls; one thread).

    python tools/bench_e2e.py [--models tiny-mixtral mid-mixtral mid-mixtral-i1536 mid-deepseek
                               mid-llama4] [--variants ...]
                              [--engines ...] [--rounds 3] [--work build/bench-e2e]

Models: the bundled tiny-mixtral, a mid-size random Mixtral (hidden 512, intermediate 1024,
8 layers, 8 experts top-2; speed depends on shapes, not values) and, on request, the same with
experts 1536 wide (rows of no power-of-two length, as Mixtral-8x7B's 14336), a mid-size random
DeepSeek-V3 (hidden 512, 8 layers, the first dense; 16 routed experts of width 256, top-2 by grouped
sigmoid routing, and one shared expert; MLA attention) and a mid-size random Llama-4 (hidden 512, 8
layers, every one MoE: 16 routed experts of width 512, top-1, and a shared expert; transformers runs
every expert on every token). Variants: uncompressed, int4 (RTN, groups of 128, every linear), int8
(the same in 8 bits), int4 per-channel (asymmetric, one scale and zero point per output row), int8
per-channel (symmetric: the usual int8 weight format), the paper recipe's shape (25% of MoE
sub-layers dropped + int4; which layers and how the codes were found do not change the speed, so
the benchmark drops by a fixed seed instead of calibrating), and 25% of each layer's experts
dropped (seeded) + int4.
"onnxruntime int8 activations" runs an export with `int8_activations=True` (quantized variants only).
Each (model, variant, engine) runs in its own process, loading what a user would load (a
transformers checkpoint, a moepass artifact lowered on load, an exported ONNX directory), so peak
memory is that of one engine: the max RSS of the process, imports included. Prefill: one 128-token
prompt; decode: 32 tokens after a 16-token prompt, KV cache. Times are medians. The host is shared
and one process can run 2x slower than the next, so every run is measured `--rounds` times (3),
interleaved; the table gives medians over the rounds, their ratios to the median of transformers
eager on the uncompressed model, and "decode range" the rounds' spread.
"warm-up s" is the first prompt plus the first decode steps (first round): for the compiled engine,
its compilation time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT, DECODE_PROMPT, DECODE_TOKENS, REPEATS = 128, 16, 32, 3
_MID = dict(  # shared by the mid-size models: speed depends on shapes, not values
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
)
MID_MIXTRAL = dict(_MID, num_local_experts=8)
MID_DEEPSEEK = dict(
    _MID,
    moe_intermediate_size=256,
    first_k_dense_replace=1,
    n_routed_experts=16,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
)
# Llama-4 Scout's shape, scaled down: 16 experts top-1 plus a shared one in every layer; transformers
# runs every expert on every token (pre-scaled rows), moepass only the chosen one
MID_LLAMA4 = dict(
    _MID,
    intermediate_size=512,
    intermediate_size_mlp=1024,
    num_local_experts=16,
    num_experts_per_tok=1,
    head_dim=64,
    moe_layers=None,  # every layer (the tiny random config's are [1, 2])
    no_rope_layer_interval=4,  # and the released models' attention, not the tiny config's
    attention_chunk_size=8192,
    floor_scale=8192,
    attn_scale=0.1,
)
RANDOM_MODELS = {
    "mid-mixtral": ("mixtral", MID_MIXTRAL),
    # expert rows of no power-of-two length, like Mixtral-8x7B's 14336: per-channel formats' worst case
    "mid-mixtral-i1536": ("mixtral", dict(MID_MIXTRAL, intermediate_size=1536)),
    "mid-deepseek": ("deepseek_v3", MID_DEEPSEEK),
    "mid-llama4": ("llama4_text", MID_LLAMA4),
}
INT8_ONNX = "onnxruntime int8 activations"
ENGINES = ("moepass PyTorch", "moepass PyTorch compiled", "onnxruntime", INT8_ONNX)
INT4 = {
    "bits": 4,
    "group_size": 128,
    "targets": ["experts", "shared_experts", "attention", "dense_mlp", "lm_head"],
}
VARIANTS = {
    "uncompressed": [],
    "int4": [("rtn", INT4)],
    "int8": [("rtn", dict(INT4, bits=8))],
    "int4 per-channel": [("rtn", dict(INT4, group_size=-1))],
    "int8 per-channel": [("rtn", dict(INT4, bits=8, group_size=-1, symmetric=True))],
    "paper recipe": [("rtn", INT4), ("layer_drop", {"ratio": 0.25, "metric": "random", "seed": 0})],
    # a quarter of each layer's experts dropped: onnxruntime must keep its fused MoE/QMoE op
    "25% experts + int4": [("expert_drop", {"ratio": 0.25, "score": "random"}), ("rtn", INT4)],
}


# ------------------------------------------------------------------------------------------------
# preparation (parent process): checkpoints, artifacts, ONNX exports
# ------------------------------------------------------------------------------------------------
def prepare(model_name: str, work: Path, variants: list[str]) -> dict[str, Path]:
    import moepass
    from moepass.onnx_export import export_onnx
    from moepass.zoo import load_model, random_model

    hf_dir = work / model_name / "hf"
    if not hf_dir.exists():
        if model_name == "tiny-mixtral":
            model = load_model("builtin:tiny-mixtral")
        else:
            family, config = RANDOM_MODELS[model_name]
            model = random_model(family, seed=0, **config)
        model.save_pretrained(hf_dir)
    model = load_model(str(hf_dir))
    program = moepass.capture(model)
    paths = {"hf": hf_dir}
    for variant in variants:
        recipe = VARIANTS[variant]
        slug = variant.replace(" ", "-")
        artifact, onnx_dir = work / model_name / slug, work / model_name / f"{slug}.onnx"
        int8_dir = work / model_name / f"{slug}.int8-activations.onnx"
        if not artifact.exists() or not onnx_dir.exists() or (recipe and not int8_dir.exists()):
            compressed = moepass.compress(program, recipe) if recipe else program
            print(f"  {model_name} {variant}: saving and exporting ...", file=sys.stderr, flush=True)
            moepass.save(compressed, artifact, overwrite=True)
            export_onnx(compressed, onnx_dir, overwrite=True)
            if recipe:  # int8 activations need quantized matmuls
                export_onnx(compressed, int8_dir, overwrite=True, int8_activations=True)
        paths[variant], paths[f"{variant} onnxruntime"] = artifact, onnx_dir
        if recipe:
            paths[f"{variant} {INT8_ONNX}"] = int8_dir
    return paths


# ------------------------------------------------------------------------------------------------
# one measurement (child process)
# ------------------------------------------------------------------------------------------------
def _hf_engine(path: Path):
    from transformers import DynamicCache

    from moepass.zoo import load_model

    model = load_model(str(path))

    def prefill(ids):
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    def decode(ids, steps):
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = model(ids, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                out = model(token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - start)
            return times

    return prefill, decode


def _step_engine(program):
    """Prefill/decode through any object with the MoEProgram step contract."""

    def prefill(ids):
        mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
        return program.step(ids, mask, positions, program.empty_cache(1), last_token_only=True)[0]

    def decode(ids, steps):
        mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
        logits, past = program.step(ids, mask, positions, program.empty_cache(1), last_token_only=True)
        token, times = logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=-1)
            positions = positions[:, -1:] + 1
            start = time.perf_counter()
            logits, past = program.step(token, mask, positions, past, last_token_only=True)
            token = logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
        return times

    return prefill, decode


def measure(engine: str, path: Path) -> dict:
    torch.set_num_threads(1)
    if engine == "transformers eager":
        prefill, decode = _hf_engine(path)
    elif engine.startswith("moepass PyTorch"):
        import moepass

        prefill, decode = _step_engine(moepass.load(path, compile=engine.endswith("compiled")))
    else:
        from moepass.onnx_export import OnnxProgram

        prefill, decode = _step_engine(OnnxProgram(path, threads=1))
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 4096, (1, PROMPT), generator=generator)
    start = time.perf_counter()
    prefill(prompt)  # warm-up (compiles the prompt graph where the engine compiles)
    decode(prompt[:, :DECODE_PROMPT], 4)  # and the one-token graph
    warm_up = time.perf_counter() - start
    prefill_s = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        prefill(prompt)
        prefill_s.append(time.perf_counter() - start)
    step_s = [statistics.median(decode(prompt[:, :DECODE_PROMPT], DECODE_TOKENS)) for _ in range(REPEATS)]
    return {
        "prefill tok/s": PROMPT / statistics.median(prefill_s),
        "decode tok/s": 1 / statistics.median(step_s),
        "peak RSS MB": _peak_rss_mb(),
        "warm-up s": warm_up,
    }


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss carries the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run_child(engine: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", engine, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{engine} on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(results: list[dict], baselines: list[dict]) -> list[str]:
    """Table cells of one run over the rounds: median speeds and their ratios to the baseline's medians
    (a process's speed is what varies, not a round's, so ratios within a round would add noise); the
    decode range shows the spread; memory is the largest, the warm-up the first round's (compiling
    with Inductor's cache as it was)."""

    def median(key: str, of: list[dict]) -> float:
        return statistics.median(r[key] for r in of)

    prefill, decode = median("prefill tok/s", results), median("decode tok/s", results)
    decodes = [r["decode tok/s"] for r in results]
    return [
        f"{prefill:.0f}",
        f"{prefill / median('prefill tok/s', baselines):.2f}x",
        f"{decode:.1f}",
        f"{decode / median('decode tok/s', baselines):.2f}x",
        f"{min(decodes):.0f}-{max(decodes):.0f}",
        f"{max(r['peak RSS MB'] for r in results):.0f}",
        f"{results[0]['warm-up s']:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = ["tiny-mixtral", *RANDOM_MODELS]
    parser.add_argument("--models", nargs="+", choices=models, default=["tiny-mixtral", "mid-mixtral"])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=Path("build/bench-e2e"))
    parser.add_argument("--rounds", type=int, default=3, help="times each run is measured, interleaved")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return

    from moepass.table import format_table

    torch.set_num_threads(1)
    rows = []
    for model_name in args.models:
        print(f"preparing {model_name} ...", file=sys.stderr, flush=True)
        paths = prepare(model_name, args.work, args.variants)
        runs = [("uncompressed", "transformers eager", paths["hf"])]  # the baseline, whatever variants run
        for variant in args.variants:
            for engine in args.engines:
                if engine == INT8_ONNX and f"{variant} {engine}" not in paths:
                    continue  # nothing quantized to run on int8 activations
                runs.append((variant, engine, paths.get(f"{variant} {engine}", paths[variant])))
        rounds = []  # each round measures every run once, in the same order: noise hits all alike
        for number in range(1, args.rounds + 1):
            rounds.append([_run_child(engine, path) for _, engine, path in runs])
            speeds = ", ".join(f"{r['prefill tok/s']:.0f}/{r['decode tok/s']:.1f}" for r in rounds[-1])
            print(f"  {model_name} round {number}, prefill/decode tok/s: {speeds}", file=sys.stderr)
        baselines = [measured[0] for measured in rounds]
        for i, (variant, engine, _) in enumerate(runs):
            rows.append([model_name, variant, engine, *_summary([r[i] for r in rounds], baselines)])
    header = ["model", "variant", "engine", "prefill tok/s", "vs eager", "decode tok/s", "vs eager"]
    header += ["decode range", "peak RSS MB", "warm-up s"]
    print(format_table(header, rows))


if __name__ == "__main__":
    main()
