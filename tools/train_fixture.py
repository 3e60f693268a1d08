"""Train moepass's bundled MoE models on the offline corpus (one CPU core).

    python tools/prepare_corpus.py --out build/corpus
    python tools/train_fixture.py tiny-mixtral --minutes 100 --out build/fixtures
    python tools/train_fixture.py tiny-deepseek --minutes 50 --out build/fixtures

Reproducible: fixed seeds, logged config, deterministic data order; only the wall-clock budget (the
learning-rate schedule is cosine in elapsed time) depends on the machine. Routing stays balanced
per layer: transformers' built-in auxiliary loss pools all layers, and single layers then collapse,
so each MoE layer gets its own Switch-style load-balancing loss; the DeepSeek-style model also
updates its expert-selection bias after every step (DeepSeek-V3's auxiliary-loss-free balancing).

Writes <out>/<name>/: config.json, model.safetensors (bf16), tokenizer.json, train_log.json.
`--bundle` then ships a trained checkpoint inside the package (moepass/assets/models/<name>/):
weights xz-compressed (about 0.7x; the decompressed bytes are the safetensors file), and a model
card measured on the bundled model itself through the same code users run (`moepass eval`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import math
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer

SEQ_LEN = 256
EOS_ID = 2  # "<eos>" in the corpus tokenizer

MODELS = {
    "tiny-mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            router_aux_loss_coef=0.0,
        ),
    ),
    "tiny-deepseek": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            kv_lora_rank=64,
            q_lora_rank=None,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            rope_interleave=False,
        ),
    ),
}
HYPER = dict(
    lr=3e-3,
    min_lr_ratio=0.1,
    warmup_steps=20,
    betas=(0.9, 0.95),
    weight_decay=0.1,
    batch=16,
    clip=1.0,
    balance_coef=0.01,
    bias_update=1e-3,
    seed=0,
    eval_every_s=600,
    eval_sequences=24,
)


def load_split(corpus: Path, split: str) -> list[dict]:
    with gzip.open(corpus / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def pack(docs: list[dict], tokenizer: Tokenizer) -> torch.Tensor:
    """All documents, each followed by <eos>, cut into windows of SEQ_LEN + 1 tokens."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([d["text"] for d in docs]):
        ids.extend(encoding.ids)
        ids.append(EOS_ID)
    usable = (len(ids) - 1) // SEQ_LEN * SEQ_LEN
    stream = torch.tensor(ids[: usable + 1])
    return stream[:usable].view(-1, SEQ_LEN), stream[1 : usable + 1].view(-1, SEQ_LEN)


class RouterTap:
    """Keeps each MoE layer's router outputs of the current step (for balancing)."""

    def __init__(self, model):
        self.outputs: list[tuple] = []
        self.routers = [m for m in model.modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter"))]
        for router in self.routers:
            router.register_forward_hook(lambda module, args, out: self.outputs.append(out))

    def balance_loss(self, sigmoid: bool) -> torch.Tensor:
        losses = []
        for logits, _, indices in self.outputs:
            num_experts = logits.shape[-1]
            scores = torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), dim=-1)
            probs = scores / scores.sum(-1, keepdim=True)
            counts = torch.zeros(num_experts, device=logits.device).index_add_(
                0, indices.reshape(-1), torch.ones(indices.numel(), device=logits.device)
            )
            fraction = counts / indices.numel()
            losses.append(num_experts * (fraction * probs.mean(0)).sum())
        return torch.stack(losses).mean()

    @torch.no_grad()
    def update_selection_bias(self, step: float) -> None:
        """DeepSeek-V3: raise the bias of under-loaded experts, lower it for over-loaded ones."""
        for router, (logits, _, indices) in zip(self.routers, self.outputs, strict=True):
            load = torch.bincount(indices.reshape(-1), minlength=logits.shape[-1]).float()
            router.e_score_correction_bias += step * torch.sign(load.mean() - load)


@torch.no_grad()
def validation_loss(model, inputs, targets, sources, sequences: int) -> dict[str, float]:
    model.eval()
    out = {}
    for source in sorted(set(sources)):
        rows = [i for i, s in enumerate(sources) if s == source][:sequences]
        logits = model(inputs[rows]).logits
        out[source] = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten()).item()
    model.train()
    return out


def train(name: str, minutes: float, corpus: Path, out: Path) -> None:
    torch.set_num_threads(1)
    hp = HYPER
    random.seed(hp["seed"])
    torch.manual_seed(hp["seed"])
    config_class, model_class, overrides = MODELS[name]
    config = getattr(transformers, config_class)(**overrides)
    model = getattr(transformers, model_class)(config).train()
    tokenizer = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    inputs, targets = pack(load_split(corpus, "train"), tokenizer)
    val_docs = load_split(corpus, "validation")
    val = {
        source: pack([d for d in val_docs if d["source"] == source], tokenizer)
        for source in sorted({d["source"] for d in val_docs})
    }
    val_inputs = torch.cat([v[0] for v in val.values()])
    val_targets = torch.cat([v[1] for v in val.values()])
    val_sources = [s for s, v in val.items() for _ in range(v[0].shape[0])]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{name}: {params / 1e6:.2f}M params, {inputs.numel() / 1e6:.2f}M training tokens, "
        f"budget {minutes} min",
        flush=True,
    )

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["lr"],
        betas=hp["betas"],
    )
    tap = RouterTap(model)
    sigmoid = config.model_type == "deepseek_v3"
    generator = torch.Generator().manual_seed(hp["seed"])
    order = torch.randperm(inputs.shape[0], generator=generator)
    budget, start, step, cursor, epoch = minutes * 60, time.time(), 0, 0, 0
    log = {"name": name, "config": config.to_dict(), "hyper": hp, "params": params, "steps": [], "evals": []}
    best, last_eval = (math.inf, None), start
    while (elapsed := time.time() - start) < budget:
        if cursor + hp["batch"] > len(order):
            order, cursor, epoch = torch.randperm(inputs.shape[0], generator=generator), 0, epoch + 1
        rows = order[cursor : cursor + hp["batch"]]
        cursor += hp["batch"]
        progress = elapsed / budget
        warm = min(1.0, (step + 1) / hp["warmup_steps"])
        cosine = hp["min_lr_ratio"] + (1 - hp["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = hp["lr"] * warm * cosine
        tap.outputs.clear()
        logits = model(inputs[rows]).logits
        lm_loss = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
        balance = tap.balance_loss(sigmoid)
        (lm_loss + hp["balance_coef"] * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sigmoid:
            tap.update_selection_bias(hp["bias_update"])
        step += 1
        if step % 20 == 0:
            tokens = step * hp["batch"] * SEQ_LEN
            rate = tokens / (time.time() - start)
            log["steps"].append(
                {"step": step, "tokens": tokens, "loss": lm_loss.item(), "balance": balance.item()}
            )
            print(
                f"step {step} epoch {epoch} {elapsed / 60:5.1f}/{minutes} min  loss {lm_loss.item():.3f}  "
                f"balance {balance.item():.3f}  lr {optimizer.param_groups[0]['lr']:.2e}  {rate:.0f} tok/s",
                flush=True,
            )
        if time.time() - last_eval > hp["eval_every_s"] or time.time() - start >= budget:
            last_eval = time.time()
            losses = validation_loss(model, val_inputs, val_targets, val_sources, hp["eval_sequences"])
            mean = sum(losses.values()) / len(losses)
            log["evals"].append(
                {
                    "step": step,
                    "minutes": elapsed / 60,
                    "val_ppl": {s: math.exp(v) for s, v in losses.items()},
                }
            )
            print(
                f"eval step {step}: " + ", ".join(f"{s} ppl {math.exp(v):.1f}" for s, v in losses.items()),
                flush=True,
            )
            if mean < best[0]:
                best = (
                    mean,
                    {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()},
                )
                save(out / name, config, best[1], corpus, log, step, time.time() - start)
    log["epochs"] = epoch + cursor / len(order)
    save(out / name, config, best[1], corpus, log, step, time.time() - start)
    print(f"done: {step} steps, best mean validation loss {best[0]:.3f}", flush=True)


def save(directory: Path, config, state: dict, corpus: Path, log: dict, steps: int, seconds: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config.dtype = "bfloat16"
    config.save_pretrained(directory)
    # tied weights are stored once (safetensors refuses shared storage)
    state = {k: v for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "tokenizer.json").write_bytes((corpus / "tokenizer.json").read_bytes())
    log = {
        **log,
        "steps_done": steps,
        "seconds": seconds,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (directory / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


def bundle(name: str, trained: Path) -> None:
    """Copy a trained checkpoint into the package and write its model card from measurements."""
    from moepass.evaluate import evaluate
    from moepass.zoo import load_model, load_tokenizer, models_dir

    source, target = trained / name, Path(str(models_dir())) / name
    target.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "tokenizer.json"):
        (target / file).write_bytes((source / file).read_bytes())
    raw = (source / "model.safetensors").read_bytes()
    (target / "model.safetensors.xz").write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    log = json.loads((source / "train_log.json").read_text())
    torch.set_num_threads(1)
    model, tokenizer = load_model(f"builtin:{name}"), load_tokenizer(f"builtin:{name}")
    default = evaluate(model, "builtin:test", tokenizer=tokenizer)
    full_test = evaluate(model, "builtin:test", tokenizer=tokenizer, max_per_source=None)
    full_val = evaluate(model, "builtin:validation", tokenizer=tokenizer, max_per_source=None)
    usage = expert_usage(model, tokenizer)
    card = {
        "name": name,
        "default_eval": default.to_dict(),
        "test": full_test.to_dict(),
        "validation": full_val.to_dict(),
        "expert_usage_entropy": usage,
        "training": {
            k: log[k]
            for k in (
                "hyper",
                "params",
                "steps_done",
                "seconds",
                "machine",
                "torch",
                "transformers",
                "epochs",
            )
            if k in log
        },
        "training_tokens": log["steps_done"] * log["hyper"]["batch"] * SEQ_LEN,
        "weights_bytes_xz": (target / "model.safetensors.xz").stat().st_size,
    }
    (target / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (target / "MODEL_CARD.md").write_text(model_card(card, log, default, full_test, full_val))
    print((target / "MODEL_CARD.md").read_text())


@torch.no_grad()
def expert_usage(model, tokenizer) -> dict[str, float]:
    """Per MoE layer: entropy of the experts chosen over the test split / log(E) (1 = perfectly even)."""
    from moepass.data import evaluation_set

    data = evaluation_set("builtin:test", tokenizer, max_per_source=64)
    tap = RouterTap(model)
    for begin in range(0, len(data), 8):
        model(data.input_ids[begin : begin + 8])
    out = {}
    for layer, (logits, _, indices) in enumerate(_per_layer(tap.outputs, len(tap.routers))):
        counts = torch.bincount(indices.reshape(-1), minlength=logits.shape[-1]).float()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        out[str(layer)] = entropy / math.log(logits.shape[-1])
    return out


def _per_layer(outputs: list[tuple], layers: int) -> list[tuple]:
    """Concatenate the per-batch router outputs of each layer (hooks fire layer by layer)."""
    merged = []
    for layer in range(layers):
        chunks = outputs[layer::layers]
        merged.append(tuple(torch.cat([c[i] for c in chunks]) for i in range(3)))
    return merged


def model_card(card: dict, log: dict, default, full_test, full_val) -> str:
    config = log["config"]
    training = card["training"]
    minutes = training["seconds"] / 60
    h = training["hyper"]
    usage = ", ".join(f"{v:.3f}" for v in card["expert_usage_entropy"].values())
    mib = card["weights_bytes_xz"] / 2**20
    epochs = training.get("epochs", 0)
    versions = f"torch {training['torch']}, transformers {training['transformers']}"
    return f"""# {card["name"]}

A small {config["model_type"]} MoE causal LM trained from scratch by `tools/train_fixture.py` on the
bundled corpus (Python manual, King James Bible, Jane Austen; see `moepass/assets/corpus/README.md`),
shipped so that compression quality can be measured with no download. Weights: bf16,
xz-compressed safetensors ({mib:.1f} MiB). Tokenizer: byte-level BPE, 4096 tokens.

## Architecture
{_architecture(config)}

## Training
- {card["training_tokens"] / 1e6:.1f}M tokens ({epochs:.2f} epochs of the train split),
  {training["steps_done"]} steps, {minutes:.0f} minutes on one CPU core ({training["machine"]}), {versions}.
- AdamW (0.9, 0.95), weight decay {h["weight_decay"]:g}, lr {h["lr"]:g} with {h["warmup_steps"]} warm-up
  steps and a cosine in elapsed time to {h["min_lr_ratio"]:g}x; batch {h["batch"]} x {SEQ_LEN} tokens;
  gradient clip {h["clip"]:g}; seed {h["seed"]}.
- Per-layer load-balancing loss (coefficient {h["balance_coef"]:g}){_bias_note(config)}.
- The checkpoint kept is the one with the best validation loss.

## Quality (measured on this bundled checkpoint, fp32)
Default evaluation (`moepass eval builtin:{card["name"]}`: test split, at most 64 windows of 256 tokens
per domain):

{default.table()}

Whole test split:

{full_test.table()}

Whole validation split:

{full_val.table()}

Expert-usage entropy per MoE layer on the test split (normalised; 1.0 = every expert equally used):
{usage}.
"""


def _architecture(config: dict) -> str:
    c = config
    if c["model_type"] == "mixtral":
        return (
            f"Mixtral: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"{c['num_attention_heads']} heads, {c['num_local_experts']} experts of intermediate "
            f"{c['intermediate_size']}, top-{c['num_experts_per_tok']}, vocab {c['vocab_size']}."
        )
    return (
        f"DeepSeek-V3: {c['num_hidden_layers']} layers (the first {c['first_k_dense_replace']} dense, "
        f"intermediate {c['intermediate_size']}), hidden {c['hidden_size']}, multi-head latent "
        f"attention ({c['num_attention_heads']} heads, kv_lora {c['kv_lora_rank']}); MoE layers: "
        f"{c['n_routed_experts']} routed experts of intermediate {c['moe_intermediate_size']}, "
        f"top-{c['num_experts_per_tok']}, sigmoid scores with selection bias, group-limited routing "
        f"({c['topk_group']} of {c['n_group']} groups), {c['n_shared_experts']} shared "
        f"expert; tied embeddings; vocab {c['vocab_size']}."
    )


def _bias_note(config: dict) -> str:
    if config["model_type"] != "deepseek_v3":
        return ""
    return " and DeepSeek-V3's bias update of the expert-selection scores after every step (step 1e-3)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--corpus", type=Path, default=Path("build/corpus"))
    parser.add_argument("--out", type=Path, default=Path("build/fixtures"))
    parser.add_argument("--bundle", action="store_true", help="ship the trained checkpoint in the package")
    args = parser.parse_args()
    if args.bundle:
        bundle(args.name, args.out)
    else:
        train(args.name, args.minutes, args.corpus, args.out)


if __name__ == "__main__":
    main()
