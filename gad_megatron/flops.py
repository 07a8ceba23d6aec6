"""Model FLOPs of a training step of our decoder (GQA attention, gated MLP), for MFU.

Counted per sequence of length s, per layer, forward, as 2 FLOPs per multiply-add of each
matrix product (norms, RoPE, softmax and the optimizer are left out: they are a few percent
at the sizes MFU is quoted for, and every published MFU leaves them out too):

    q, k, v projections   2 s h (nh d + 2 nkv d)
    attention             2 * 2 nh d P        (q.k and the weighted sum of v)
    output projection     2 s (nh d) h
    gated MLP             2 s 3 h f           (gate, up, down)

with h the hidden size, nh/nkv the query/key-value heads, d the head dim, f the MLP width,
and P = s (s + 1) / 2 the query-key pairs a causal mask needs: the packed/flash kernels
compute only those, so counting s^2 would inflate MFU by up to 2x at long lengths. The
output layer adds 2 s h V once per sequence. A training step is 3x the forward (the
backward costs two products per forward one: grads of inputs and of weights). Activation
recompute is not counted: MFU counts the model's FLOPs, not the hardware's.
"""

from __future__ import annotations

from typing import Iterable

# Dense bf16 tensor-core peak per GPU, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def forward_flops_per_sequence(arch, s: int) -> int:
    """Forward FLOPs of one sequence of `s` tokens (see the module docstring)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    pairs = s * (s + 1) // 2
    per_layer = (2 * s * h * (q + 2 * kv)  # q, k, v projections
                 + 2 * 2 * q * pairs  # scores and the weighted sum of v
                 + 2 * s * q * h  # output projection
                 + 2 * s * 3 * h * f)  # gate, up, down
    return arch.num_layers * per_layer + 2 * s * h * arch.vocab_size


def train_flops(arch, lengths: Iterable[int]) -> int:
    """Model FLOPs of forward + backward over sequences of these lengths."""
    return 3 * sum(forward_flops_per_sequence(arch, s) for s in lengths)


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a GPU by its CUDA name ('NVIDIA H100 80GB HBM3'), None if unknown."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return peak
    return None
