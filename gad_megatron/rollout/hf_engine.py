"""A rollout engine on transformers' `generate`: the CPU engine, and a small-GPU fallback.

Log-probs: for each sampled token the engine reports log_softmax(raw_logits / temperature) at
that position, i.e. the log-prob under the temperature-scaled sampling distribution *before*
top-p truncation. This is what the trainer recomputes from its own logits at the same
temperature, so the two agree (up to float noise) whatever top_p is. At temperature 0
(greedy; accepted here for tests although the run config requires > 0) the temperature-1
log-probs are reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from gad_megatron.rollout.base import Generation


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


@torch.no_grad()
def _reset_rotary_buffers(model) -> None:
    """Recompute the rotary `inv_freq` buffers from the config.

    They are non-persistent (not in the checkpoint): transformers fills them during its init
    pass, which leaves them uninitialised when megatron_patches are active in the process (its
    CPU redirect of tensor factories; seen with transformers 5.x). The weight sync never sends
    buffers, so a wrong buffer would silently decode with the wrong positions; recompute them
    here, with the module's own rope function, whatever the loader did.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for module in model.modules():
        if not (hasattr(module, "inv_freq") and hasattr(module, "rope_type")):
            continue
        fn = (module.compute_default_rope_parameters if module.rope_type == "default"
              else ROPE_INIT_FUNCTIONS[module.rope_type])
        inv_freq, scaling = fn(module.config)
        module.inv_freq.copy_(inv_freq)
        if hasattr(module, "original_inv_freq"):
            module.original_inv_freq.copy_(inv_freq)
        module.attention_scaling = scaling


class HFEngine:
    """Samples with `model.generate` (KV cache, left-padded batches); weights replaced in place."""

    def __init__(self, hf_config: dict, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 eos_id: int | list[int] | None = None, pad_id: int | None = None,
                 model=None):
        import transformers as tf

        cfg = dict(hf_config)
        if "model_type" not in cfg:  # configs built by hand may name only the architecture
            from gad_megatron.models.hf_config import parse_hf_config

            cfg["model_type"] = parse_hf_config(cfg).family
        if model is None:
            config = tf.AutoConfig.for_model(**cfg)
            model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
        _reset_rotary_buffers(model)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        # A checkpoint's generation_config.json (Qwen ships top_k=20, repetition_penalty...)
        # would silently change the sampling distribution; the engine sets every knob itself.
        self.model.generation_config = tf.GenerationConfig()
        self.eos_ids = _as_id_list(eos_id if eos_id is not None else cfg.get("eos_token_id"))
        if not self.eos_ids:
            raise ValueError("HFEngine needs an EOS id (config eos_token_id or eos_id=...)")
        pad = pad_id if pad_id is not None else cfg.get("pad_token_id")
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        # Parameters by HF name, tied aliases included (`lm_head.weight` when tied is the
        # embedding itself), so an update for either name writes the one shared tensor.
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        self._on_gpu_device = self.device if self.device.type == "cuda" else None

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str = "cpu", **kwargs) -> "HFEngine":
        """Load an HF model directory (config.json + safetensors)."""
        import transformers as tf

        cfg = json.loads((Path(path) / "config.json").read_text())
        model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        return cls(cfg, dtype=dtype, device=device, model=model, **kwargs)

    # ------------------------------------------------------------------ generation

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generation_config(self, n: int, temperature: float, top_p: float, max_new_tokens: int):
        import transformers as tf

        greedy = temperature == 0.0
        # top_k=0 turns off transformers' default top-k of 50 (sampling only: greedy rejects it).
        sampling = {} if greedy else {"temperature": float(temperature), "top_p": float(top_p),
                                      "top_k": 0}
        return tf.GenerationConfig(
            do_sample=not greedy, num_return_sequences=n, max_new_tokens=max_new_tokens,
            min_new_tokens=0, repetition_penalty=1.0, num_beams=1,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, use_cache=True,
            output_logits=True, return_dict_in_generate=True, **sampling)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> Generation:
        """n samples per prompt, prompt-major; temperature 0 means greedy."""
        if temperature < 0 or not 0 < top_p <= 1 or n < 1 or max_new_tokens < 1:
            raise ValueError(f"bad sampling parameters: n={n} temperature={temperature} "
                             f"top_p={top_p} max_new_tokens={max_new_tokens}")
        ids, mask = self._left_pad(prompts)
        devices = [self.device] if self.device.type == "cuda" else []
        # fork_rng: the seed makes this call reproducible without disturbing the caller's RNG.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            try:
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask,
                    generation_config=self._generation_config(n, temperature, top_p,
                                                              max_new_tokens))
            except RuntimeError as exc:
                if "probability tensor" not in str(exc):
                    raise
                # torch.multinomial's own words; say what it means for the run instead.
                from gad_megatron.workers.common import NonFiniteError

                raise NonFiniteError("rollout: the student's next-token probabilities are "
                                     "NaN/inf: its weights diverged after the last update "
                                     "(lower actor.optim.lr)") from None
        new_tokens = out.sequences[:, ids.shape[1]:].cpu()
        scale = temperature if temperature > 0 else 1.0
        # [B*n, steps]: log-prob of each generated token under softmax(raw logits / T).
        logits = torch.stack(out.logits, dim=1).float().cpu()
        lp = torch.log_softmax(logits / scale, dim=-1).gather(-1, new_tokens.unsqueeze(-1))
        return self._to_generation(new_tokens, lp.squeeze(-1), n)

    def _to_generation(self, tokens: torch.Tensor, logprobs: torch.Tensor, n: int) -> Generation:
        responses, lps, finished = [], [], []
        eos = set(self.eos_ids)
        for row, row_lp in zip(tokens.tolist(), logprobs.tolist()):
            end = next((k + 1 for k, t in enumerate(row) if t in eos), None)
            # Everything after the first EOS is padding the batch added; keep the EOS itself.
            cut = end if end is not None else len(row)
            responses.append(row[:cut])
            lps.append(row_lp[:cut])
            finished.append(end is not None)
        group = [i // n for i in range(len(responses))]
        return Generation(responses=responses, logprobs=lps, group_index=group, finished=finished)

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors into the model (bitwise when the dtypes agree).

        The whole batch is checked before anything is copied, so a refused batch leaves the
        engine unchanged.
        """
        batch = list(named_tensors)
        for name, tensor in batch:
            if name not in self._params:
                raise KeyError(f"update_weights: unknown parameter {name!r} (not in the "
                               f"engine's {type(self.model).__name__})")
            want = tuple(self._params[name].shape)
            if tuple(tensor.shape) != want:
                raise ValueError(f"update_weights: {name!r} has shape {list(tensor.shape)}, "
                                 f"the engine's parameter is {list(want)}")
        for name, tensor in batch:
            self._params[name].data.copy_(tensor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The engine's weights by HF name (for checks and tests)."""
        return {k: v.detach() for k, v in self._params.items()}

    def weight_manifest(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype name) of the weights a sync must send: each tensor once, so
        a tied LM head (the embedding under a second name) is not asked for, as the
        trainer's export does not send it."""
        from gad_megatron.resharding.transport import dtype_name

        return {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in self.model.named_parameters()}

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """On GPU: move the weights to host memory and free the cache. On CPU: nothing to
        release (weights are already in host memory and there is no KV cache between calls)."""
        if self._on_gpu_device is not None:
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Undo `sleep`."""
        if self._on_gpu_device is not None:
            self.model.to(self._on_gpu_device)
