"""Build a Megatron-Core `GPTModel` (this rank's TP/PP shard) from an HF architecture.

Uses Transformer Engine's layer spec when TE is importable on a CUDA machine, and the local
(pure PyTorch) spec on CPU. On CUDA without TE the build is refused unless the role's
`perf.allow_local_spec` asks for the local spec (models/perf.py says why). Parameter names
differ between the two; the converter's name table covers both.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gad_megatron.models.hf_config import HFArch, check_parallel
from gad_megatron.models.perf import PerfConfig, transformer_kwargs, use_te_spec


@dataclass(frozen=True)
class BuildOptions:
    """How to build this rank's model shard; the architecture itself comes from HFArch."""

    dtype: torch.dtype = torch.float32
    """Parameter dtype. fp32 on CPU; bf16 on GPU keeps weights in bf16 (Megatron's optimizer
    then holds fp32 master copies)."""
    vocab_multiple: int = 128
    """The embedding is padded to a multiple of vocab_multiple * tp rows, as Megatron does;
    the padding is stripped again on export."""
    init_weights: bool = True
    """Run the random init; turn off when weights are loaded right after (saves time)."""
    use_te: bool | None = None
    """Use Transformer Engine's layer spec; None = when TE is importable and CUDA is present
    (CUDA without TE is then refused unless perf.allow_local_spec)."""
    seq_length: int | None = None
    """Longest sequence the model will see (defaults to the HF max_position_embeddings)."""
    perf: PerfConfig = PerfConfig()
    """Memory/speed settings (sequence parallel, recompute, fusions, TE refusal)."""


def on_cuda() -> bool:
    """This rank computes on a GPU (False on CPU, and under GAD_FORCE_CPU_PATCHES)."""
    from gad_megatron.parallel.dist import device

    return device().type == "cuda"


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Rows of the Megatron embedding: vocab padded so every TP rank gets an equal slice."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def transformer_config(arch: HFArch, tp: int, pp: int, opts: BuildOptions):
    """The Megatron TransformerConfig equivalent of `arch` for a (tp, pp) layout."""
    from megatron.core.transformer import TransformerConfig

    check_parallel(arch, tp, pp)
    on_gpu = on_cuda()
    te_spec = resolve_te(opts)
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.attention_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=opts.dtype,
        pipeline_dtype=opts.dtype,
        # Micro-batches keep their own [B, T] (no padding to the batch's longest): stages
        # exchange each activation's shape before it (one small message per send).
        variable_seq_lengths=pp > 1,
        # Dense models have no MoE; Megatron still refuses its default MoE dispatcher
        # ("allgather") together with variable_seq_lengths.
        moe_token_dispatcher_type="alltoall",
        bf16=opts.dtype == torch.bfloat16,
        fp16=opts.dtype == torch.float16,
        # Fused kernels need CUDA (and some need apex/TE); the unfused paths are the same maths.
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=False,
        # sequence parallel, recompute, RoPE and grad-accumulation fusions (models/perf.py)
        **transformer_kwargs(opts.perf, tp, on_gpu, te_spec),
        # The same full random init on every layout, so TP/PP runs are comparable.
        use_cpu_initialization=True,
        perform_initialization=opts.init_weights,
    )


def resolve_te(opts: BuildOptions) -> bool:
    """Whether this build uses TE's layer spec (refuses CUDA without TE unless allowed)."""
    te = importlib.util.find_spec("transformer_engine") is not None
    return use_te_spec(on_cuda(), te, opts.use_te, opts.perf.allow_local_spec)


def layer_spec(arch: HFArch, use_te: bool):
    """The transformer-layer ModuleSpec: TE's, or the local one."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    from gad_megatron.models.packed_attention import PackedDotProductAttention

    spec = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    # The local core attention also takes THD-packed micro-batches (packed_attention.py).
    # Swapped in the spec (this Megatron calls the class it names); core attention holds no
    # parameter, so checkpoints and names are unchanged.
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def _llama3_inv_freq(arch: HFArch, rotary) -> torch.Tensor:
    # Megatron's helper hard-codes nothing but its defaults; pass every llama3 parameter.
    r = arch.rope
    base = 1.0 / (r.theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float32)
                              / arch.head_dim))
    return rotary._apply_scaling(
        base, factor=r.factor, low_freq_factor=r.low_freq_factor,
        high_freq_factor=r.high_freq_factor,
        original_max_position_embeddings=r.original_max_position_embeddings,
    )


def build_gpt(arch: HFArch, tp: int, pp: int, opts: BuildOptions = BuildOptions(),
              post_process: bool | None = None):
    """This rank's GPTModel shard. Megatron's parallel state must be initialised for (tp, pp).

    `post_process` defaults to "this is the last pipeline stage"; the discriminator builds the
    same backbone and then swaps the output layer (see models/discriminator.py).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, tp, pp, opts)
    rope = arch.rope
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, resolve_te(opts)),
        vocab_size=padded_vocab_size(arch.vocab_size, tp, opts.vocab_multiple),
        max_sequence_length=opts.seq_length or arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=rope.theta,
        seq_len_interpolation_factor=rope.factor if rope.kind == "linear" else None,
        # Logits stay vocab-parallel; models/logprobs.py reduces them without a full gather.
        parallel_output=True,
    )
    if rope.kind == "llama3":
        model.rotary_pos_emb.inv_freq = _llama3_inv_freq(arch, model.rotary_pos_emb)
    if not opts.init_weights:
        mark_tensor_parallel(model)
    return model


def mark_tensor_parallel(model) -> None:
    """Tag split weights as tensor-parallel when Megatron skipped their initialisation.

    Megatron sets `tensor_model_parallel` on a weight only inside its init functions, so
    with `perform_initialization=False` (weights loaded right after) the split weights look
    replicated: the grad norm then counts them on TP rank 0 only and clipping goes wrong.
    """
    from megatron.core import tensor_parallel as tpl

    dims = ((tpl.ColumnParallelLinear, 0), (tpl.RowParallelLinear, 1),
            (tpl.VocabParallelEmbedding, 0))
    te_dims = {"column": 0, "row": 1}  # Transformer Engine linears say it by `parallel_mode`
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or getattr(weight, "tensor_model_parallel", False):
            continue
        dim = next((d for cls, d in dims if isinstance(module, cls)),
                   te_dims.get(getattr(module, "parallel_mode", None)))
        if dim is not None:
            tpl.set_tensor_model_parallel_attributes(weight, True, dim, 1)


@functools.lru_cache(maxsize=16)
def causal_mask(seq_len: int) -> torch.Tensor:
    """[T, T] bool, True above the diagonal (future keys masked); cached per length."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """Megatron attention mask [B, 1, T, T] (True = masked) from a [B, T] valid-token mask.

    Causal, and pad keys masked, so a right-padded row's valid tokens never see padding.
    """
    causal = causal_mask(valid.shape[1]).to(valid.device)
    return causal[None, None] | ~valid.bool()[:, None, None, :]
