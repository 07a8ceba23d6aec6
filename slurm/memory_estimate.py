"""Memory per GPU of each GAD role for the paper's 7B and 14B students on 8xH100 nodes.

    python slurm/memory_estimate.py            # the tables of docs/cluster.md

Disaggregated layouts (each role on GPUs of its own), and colocated ones (`run.colocate=true`:
every role on every GPU, each resident only during its own phase, `run.offload_when_colocated`;
the engine asleep at level 1 while the trainer runs).

Arithmetic only (no torch): the figures docs/cluster.md quotes, reproducible. Assumptions
(those of this project's Megatron setup on GPU):
- bf16 parameters (2 B), gradients in an fp32 buffer (Megatron's grad_reduce_in_fp32, 4 B),
  Adam with fp32 master weights, m and v (12 B), sharded over data-parallel ranks when
  `optim.use_distributed_optimizer=true` (else replicated);
- tensor parallelism without sequence parallelism (`<role>.perf.sequence_parallel`, off by
  default), so the layer-norm inputs and outputs are replicated on every TP rank; no
  activation recompute (`<role>.perf.recompute`, off by default);
- flash attention (transformer-engine on H100): no seq x seq score matrix is kept;
- a micro-batch of `micro_batch_tokens` = 4096 tokens (one sequence at the paper's 2048
  prompt + 1536 response tokens fits; the config default 8192 doubles the activations);
  logits in fp32 for the log-probabilities, with their gradient of the same size;
- OVERHEAD_GB more per GPU for the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
PAPER_TOKENS = 2048 + 1536
GPU_GB = 80.0
OVERHEAD_GB = 4.0


@dataclass(frozen=True)
class Model:
    name: str
    vocab: int
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int = 128

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def params(self, lm_head: bool = True) -> float:
        h = self.hidden
        attn = h * h * 2 + 2 * h * self.kv_dim + h + 2 * self.kv_dim  # q, o, k, v (+ qkv bias)
        layer = attn + 3 * h * self.ffn + 2 * h
        heads = self.vocab * h * (2 if lm_head else 1) + (0 if lm_head else h)  # scalar head
        return self.layers * layer + heads + h


QWEN_7B = Model("Qwen2.5-7B", 152064, 3584, 28, 18944, 28, 4)
QWEN_14B = Model("Qwen2.5-14B", 152064, 5120, 48, 13824, 40, 8)


def activations(m: Model, tokens: int, tp: int) -> float:
    """Bytes kept for backward over all layers (bf16), per TP rank."""
    replicated = 4 * m.hidden  # the two norms' inputs and outputs
    split = 2 * m.hidden + 2 * m.kv_dim + 3 * m.ffn  # q, attn out, k, v, gate, up, act
    return 2 * tokens * m.layers * (replicated + split / tp)


def trained(m: Model, tp: int, pp: int, dp: int, tokens: int, lm_head: bool,
            dist_opt: bool = True) -> dict[str, float]:
    p = m.params(lm_head) / (tp * pp)
    logits = 2 * tokens * (m.vocab / tp) * 4 if lm_head else 0.0  # fp32 logits + grad
    return {"params": 2 * p, "grads": 4 * p, "adam": 12 * p / (dp if dist_opt else 1),
            "activations": activations(m, tokens, tp) / pp, "logits": logits}


def frozen(m: Model, tp: int, tokens: int) -> dict[str, float]:
    """The reference: bf16 weights, forward only (one layer's activations live at a time)."""
    p = m.params() / tp
    return {"params": 2 * p, "logits": tokens * (m.vocab / tp) * 4}


def engine(m: Model, tp: int, gpu_gb: float = 80.0, util: float = 0.85) -> dict[str, float]:
    weights = 2 * m.params() / tp
    kv_per_token = 2 * m.layers * m.kv_dim * 2 / tp  # K and V, bf16
    cache = util * gpu_gb * GB - weights
    return {"params": weights, "kv_cache": cache, "kv_per_token": kv_per_token,
            "full_sequences": cache / (kv_per_token * PAPER_TOKENS)}


LAYOUTS = {
    # nodes: role -> (tp, pp, dp); the rollout engine as (tp, 1, 1)
    (QWEN_7B, 1): {"actor": (2, 1, 2), "discriminator": (2, 1, 1), "reference": (1, 1, 1),
                   "rollout": (1, 1, 1)},
    (QWEN_7B, 2): {"actor": (2, 1, 4), "discriminator": (2, 1, 2), "reference": (1, 1, 2),
                   "rollout": (2, 1, 1)},
    (QWEN_7B, 4): {"actor": (2, 1, 8), "discriminator": (2, 1, 4), "reference": (1, 1, 4),
                   "rollout": (4, 1, 1)},
    (QWEN_14B, 2): {"actor": (8, 1, 1), "discriminator": (4, 1, 1), "reference": (2, 1, 1),
                    "rollout": (2, 1, 1)},
    (QWEN_14B, 3): {"actor": (4, 1, 2), "discriminator": (4, 1, 2), "reference": (2, 1, 2),
                    "rollout": (4, 1, 1)},
    (QWEN_14B, 4): {"actor": (4, 1, 4), "discriminator": (4, 1, 2), "reference": (2, 1, 2),
                    "rollout": (4, 1, 1)},
}


def table(model: Model, nodes: int, tokens: int = 4096) -> list[str]:
    rows = [f"{model.name} on {nodes} node(s) ({8 * nodes} GPUs), micro-batch {tokens} tokens",
            f"{'role':14} {'layout':14} {'GPUs':>4} {'params':>7} {'grads':>6} {'adam':>6} "
            f"{'activ.':>7} {'logits':>7} {'total':>7}  (GB per GPU)"]
    used = 0
    for role, (tp, pp, dp) in LAYOUTS[(model, nodes)].items():
        gpus = tp * pp * dp
        used += gpus
        if role == "rollout":
            e = engine(model, tp)
            rows.append(f"{role:14} {f'TP{tp}':14} {gpus:>4} {e['params'] / GB:7.1f} "
                        f"{'':>6} {'':>6} {'':>7} {'':>7} {'80x0.85':>7}  KV cache "
                        f"{e['kv_cache'] / GB:.0f} GB = {e['full_sequences']:.0f} sequences "
                        f"of {PAPER_TOKENS} tokens")
            continue
        if role == "reference":
            f = frozen(model, tp, tokens)
            parts = [f["params"], 0, 0, 0, f["logits"]]
        else:
            t = trained(model, tp, pp, dp, tokens, lm_head=role == "actor")
            parts = [t["params"], t["grads"], t["adam"], t["activations"], t["logits"]]
        cells = " ".join(f"{v / GB:{w}.1f}" if v else f"{'-':>{w}}"
                         for v, w in zip(parts, (7, 6, 6, 7, 7)))
        total = sum(parts) / GB
        verdict = "fits" if total + OVERHEAD_GB <= GPU_GB else "DOES NOT FIT"
        rows.append(f"{role:14} {f'TP{tp} PP{pp} DP{dp}':14} {gpus:>4} {cells} "
                    f"{total:7.1f}  {verdict}")
    rows.append(f"GPUs used: {used} of {8 * nodes}")
    return rows


COLOCATED = {  # (model, nodes): (tp of the Megatron roles, engine tp, engine memory share)
    (QWEN_7B, 1): (2, 2, 0.5),
    (QWEN_14B, 1): (4, 4, 0.5),
    (QWEN_14B, 2): (4, 4, 0.5),
}


def colocated_phases(model: Model, nodes: int, tokens: int = 4096) -> dict[str, float]:
    """Bytes per GPU resident in each phase of a colocated gad step (every role on all
    8 x nodes GPUs at TP `tp`, DP = GPUs / tp, distributed optimizer). A role's state comes
    back when it is called; for the weight sync only the actor's weights come back
    (`Role.call_with_weights`), beside the awake engine."""
    tp, engine_tp, util = COLOCATED[(model, nodes)]
    dp = 8 * nodes // tp
    actor = trained(model, tp, 1, dp, tokens, lm_head=True)
    disc = trained(model, tp, 1, dp, tokens, lm_head=False)
    ref = frozen(model, tp, tokens)
    engine_total = util * GPU_GB * GB
    return {
        "rollout (engine awake)": engine_total,
        "reference log-probs": ref["params"] + ref["logits"],
        "discriminator update": sum(disc.values()),
        "actor update": sum(actor.values()),
        "weight sync (actor + engine)": actor["params"] + engine_total,
    }


def colocated_table(model: Model, nodes: int, tokens: int = 4096) -> list[str]:
    tp, engine_tp, util = COLOCATED[(model, nodes)]
    rows = [f"{model.name} colocated on {nodes} node(s) ({8 * nodes} GPUs): Megatron roles "
            f"TP{tp} DP{8 * nodes // tp}, engine TP{engine_tp} at "
            f"gpu_memory_utilization {util}; GB per GPU by phase"]
    phases = colocated_phases(model, nodes, tokens)
    for phase, nbytes in phases.items():
        verdict = "fits" if nbytes / GB + OVERHEAD_GB <= GPU_GB else "DOES NOT FIT"
        rows.append(f"{phase:30} {nbytes / GB:7.1f}  {verdict}")
    peak = max(phases.values()) / GB
    rows.append(f"{'peak':30} {peak:7.1f}  (host memory holds the rest: see the docstring)")
    return rows


def main() -> None:
    for m in (QWEN_7B, QWEN_14B):
        print(f"{m.name}: {m.params() / 1e9:.2f}B parameters "
              f"(discriminator {m.params(lm_head=False) / 1e9:.2f}B)")
    for model, nodes in LAYOUTS:
        print()
        print("\n".join(table(model, nodes)))
    for model, nodes in COLOCATED:
        print()
        print("\n".join(colocated_table(model, nodes)))


if __name__ == "__main__":
    main()
