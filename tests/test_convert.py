"""HF -> Megatron (dist checkpoint, any tp/pp) -> HF round trip, through the user-facing CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gad_megatron.__main__ import main
from tests.tiny_models import make_hf_model


def save_tiny_tokenizer(model_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(98)} | {"<unk>": 98, "</s>": 99}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(model_dir)


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family,tp,pp,tied", [
    ("llama", 2, 1, False), ("qwen2", 1, 2, True), ("qwen3", 2, 1, False), ("qwen3", 1, 2, False),
])
def test_round_trip_is_bitwise(tmp_path, family, tp, pp, tied):
    src = make_hf_model(family, tmp_path / "hf", tie_word_embeddings=tied)
    save_tiny_tokenizer(src)
    ckpt, back = tmp_path / "mcore", tmp_path / "hf_back"
    assert main(["convert", "hf-to-megatron", "--hf", str(src), "--out", str(ckpt),
                 "--tp", str(tp), "--pp", str(pp)]) == 0
    assert json.loads((ckpt / "gad_checkpoint.json").read_text())["tp"] == tp
    # Export at a different layout than the one saved: dist_checkpointing reshards.
    assert main(["convert", "megatron-to-hf", "--ckpt", str(ckpt), "--out", str(back)]) == 0

    original, exported = hf_tensors(src), hf_tensors(back)
    if tied:
        original.pop("lm_head.weight", None)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    assert json.loads((back / "config.json").read_text()) == \
        json.loads((src / "config.json").read_text())

    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(back)
    assert model.config.tie_word_embeddings == tied
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    tok = tf.PreTrainedTokenizerFast.from_pretrained(back)
    assert tok("w1 w2")["input_ids"] == [1, 2]
