"""HF safetensors <-> a Megatron model sharded for any (tp, pp).

- `load_hf_weights`: each rank reads only the HF tensors its shard needs (safetensors is
  memory-mapped) and cuts its shard; any missing, extra or wrong-shaped tensor stops the load
  before a single weight is copied, naming the tensor.
- `export_hf_tensors`: a streaming generator of `(hf_name, full tensor)`, the same sequence on
  every rank. Peak extra memory is one Megatron parameter gathered over TP. The rollout weight
  sync consumes this generator.
- `save_hf_dir`: an HF directory transformers loads (config, safetensors shards, tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from gad_megatron.checkpoint import name_map as nm
from gad_megatron.models.hf_config import HFArch


class CheckpointMismatch(ValueError):
    """The HF files and the architecture disagree (missing, extra or wrong-shaped tensor)."""


def _safetensor_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files (only safetensors "
                                "checkpoints are loaded; convert .bin files first)")
    return files


class HFTensorIndex:
    """Names, shapes and owning files of the tensors of an HF checkpoint, read lazily."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        self._files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in _safetensor_files(self.model_dir):
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        self._files[key] = path
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            except Exception as exc:  # safetensors' own error type is not a ValueError
                if isinstance(exc, CheckpointMismatch):
                    raise
                raise CheckpointMismatch(f"{path}: not a readable safetensors file "
                                         f"(truncated or damaged? {exc})") from None
        self._handles: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(name)

    def check_against(self, arch: HFArch) -> None:
        """Raise CheckpointMismatch naming the first missing, extra or wrong-shaped tensor."""
        expected = nm.expected_hf_shapes(arch)
        present = {k: v for k, v in self.shapes.items()
                   if not any(p.fullmatch(k) for p in nm.IGNORED_HF_PATTERNS)}
        if arch.tie_word_embeddings:
            present.pop("lm_head.weight", None)  # some writers store the tied copy anyway
        where = str(self.model_dir)
        for name in sorted(expected):
            if name not in present:
                raise CheckpointMismatch(f"{where}: missing tensor {name!r}")
            if tuple(present[name]) != tuple(expected[name]):
                raise CheckpointMismatch(
                    f"{where}: tensor {name!r} has shape {list(present[name])}, "
                    f"expected {list(expected[name])} from config.json")
        for name in sorted(present):
            if name not in expected:
                raise CheckpointMismatch(f"{where}: unexpected tensor {name!r} "
                                         f"(not part of {arch.architecture})")


def _layer_offset(model) -> int:
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    return layers[0].layer_number - 1 if layers is not None and len(layers) else 0


def _is_tied_output_copy(model, arch: HFArch, name: str) -> bool:
    return arch.tie_word_embeddings and name == "output_layer.weight"


def _local_params(model, arch: HFArch, skip: tuple[str, ...] = ()):
    """(local name, parameter, table match) for every weight this rank holds."""
    offset = _layer_offset(model)
    for name, param in model.named_parameters():
        if name.endswith(nm.IGNORED_MEGATRON_SUFFIXES) or name.startswith(skip):
            continue
        match = nm.match_megatron(name, arch, offset,
                                  tied_output=_is_tied_output_copy(model, arch, name))
        yield name, param, match


@torch.no_grad()
def load_hf_weights(model, arch: HFArch, model_dir: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Copy HF weights into this rank's shard. `skip`: local name prefixes left untouched
    (the discriminator's fresh scalar head)."""
    from megatron.core import parallel_state as ps

    index = HFTensorIndex(model_dir)
    index.check_against(arch)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    padded = model.vocab_size if hasattr(model, "vocab_size") else arch.vocab_size
    planned = []
    for name, param, match in _local_params(model, arch, skip):
        shard = nm.split_for_rank(match.rule, arch, [index.get(n) for n in match.hf_names()],
                                  tp_rank, tp, padded)
        if tuple(shard.shape) != tuple(param.shape):
            raise CheckpointMismatch(
                f"{model_dir}: {match.hf_names()} give a shard of shape {list(shard.shape)} for "
                f"Megatron parameter {name!r} of shape {list(param.shape)}")
        planned.append((param, shard))
    for param, shard in planned:  # copy only once every shard was cut and checked
        param.copy_(shard.to(dtype=param.dtype, device=param.device))


def _gather_tp(tensor: torch.Tensor) -> list[torch.Tensor]:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(shards, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
    return shards


def _stage_manifest(model, arch: HFArch, skip: tuple[str, ...]) -> list[tuple[str, tuple, str]]:
    """(local name, shape, dtype) of each exported parameter on this rank, in model order."""
    out = []
    for name, param, _ in _local_params(model, arch, skip):
        if _is_tied_output_copy(model, arch, name):
            continue  # HF has no lm_head when tied; the embedding carries it
        out.append((name, tuple(param.shape), str(param.dtype).replace("torch.", "")))
    return out


@torch.no_grad()
def export_hf_tensors(model, arch: HFArch, skip: tuple[str, ...] = ()
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, full tensor)` for the whole model, in layer order, on every rank.

    A collective: every rank of the model's TP x PP group must drain the generator. Pipeline
    stages are visited in order; each stage's parameters are gathered over TP, merged into HF
    tensors, and broadcast from that stage to the other stages.
    """
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    manifests: list = [None] * pp
    mine = (_stage_manifest(model, arch, skip), _layer_offset(model))
    if pp > 1:
        dist.all_gather_object(manifests, mine, group=ps.get_pipeline_model_parallel_group())
    else:
        manifests = [mine]
    params = dict(model.named_parameters())
    pp_group_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) \
        if pp > 1 else None
    for stage, (manifest, offset) in enumerate(manifests):
        for name, shape, dtype in manifest:
            match = nm.match_megatron(name, arch, offset)
            if stage == pp_rank:
                merged = nm.merge_shards(match.rule, arch, _gather_tp(params[name].data))
            else:
                merged = _empty_merged(match, arch, shape, getattr(torch, dtype))
            if pp > 1:
                for t in merged:
                    dist.broadcast(t, src=pp_group_ranks[stage],
                                   group=ps.get_pipeline_model_parallel_group())
            yield from zip(match.hf_names(), merged)


def _empty_merged(match: nm.Match, arch: HFArch, shard_shape, dtype) -> list[torch.Tensor]:
    # Receiving stages allocate the merged HF shapes before the broadcast.
    shapes = nm.expected_hf_shapes(arch)
    from gad_megatron.parallel.dist import device

    return [torch.empty(shapes[n], dtype=dtype, device=device()) for n in match.hf_names()]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src: str | Path | None, dst: str | Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in `src` to `dst`."""
    if src is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_hf_dir(tensors: Iterator[tuple[str, torch.Tensor]], arch: HFArch, out_dir: str | Path,
                tokenizer_src: str | Path | None = None, max_shard_bytes: int = 4 << 30,
                write: bool = True) -> None:
    """Write an HF model directory atomically: a temp dir beside `out_dir`, renamed at the end.

    `write=False` drains the generator without writing (the other ranks of a collective export).
    """
    from safetensors.torch import save_file

    if not write:
        for _ in tensors:
            pass
        return
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if size and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor.detach().to("cpu").contiguous().clone()
            size += nbytes
        _write_shards(shards, tmp, save_file)
        (tmp / "config.json").write_text(json.dumps(arch.raw, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(tokenizer_src, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shards(shards, tmp: Path, save_file) -> None:
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
