"""Rendering (chat / Alpaca), teacher tokens = continuation + EOS, length policies, tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gad_megatron.data import (
    ALPACA_TEMPLATE, DataConfig, DataError, build_builtin_tokenizer, build_dataset, eos_id,
    load_tokenizer, pad_id, validate_files,
)
from gad_megatron.data.tokenizer import builtin_vocab


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return build_builtin_tokenizer()


def test_builtin_tokenizer_is_small_deterministic_and_saveable(tmp_path, tok):
    assert len(tok) == len(builtin_vocab()) < 256
    assert build_builtin_tokenizer().get_vocab() == tok.get_vocab()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Line one\n\tx = 'y' + 3!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok("ab")["input_ids"][0] == tok.bos_token_id
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "<unk>"
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    msgs = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<bos><|user|>hi<eos><|assistant|>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_load_tokenizer_refuses_non_directories(tmp_path):
    with pytest.raises(DataError, match="not 'builtin' and not a local directory"):
        load_tokenizer("some-org/some-model")
    with pytest.raises(DataError, match="cannot load"):
        load_tokenizer(tmp_path)


def test_chat_render_and_teacher_continuation(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "add 2 and 2"}]
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "m", "messages": msgs, "teacher_response": "The answer is 4."},
        {"id": "p", "prompt": "add 2 and 2", "teacher_response": "The answer is 4.<eos>"}])
    ds = build_dataset([path], DataConfig(), tok)
    ex = ds[0]
    assert tok.decode(ex.prompt_ids) == \
        "<bos><|system|>Be terse.<eos><|user|>add 2 and 2<eos><|assistant|>"
    assert ex.teacher_ids.dtype == np.int32
    assert tok.decode(ex.teacher_ids) == "The answer is 4.<eos>"
    assert ex.teacher_ids[-1] == tok.eos_token_id
    # A plain prompt is one user turn; an answer already ending in EOS gets no second one.
    assert tok.decode(ds[1].prompt_ids) == "<bos><|user|>add 2 and 2<eos><|assistant|>"
    assert tok.decode(ds[1].teacher_ids) == "The answer is 4.<eos>"
    # Prompt then answer is exactly the chat template applied to the full conversation.
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "The answer is 4."}],
                                   tokenize=False)
    assert tok.decode(np.concatenate([ex.prompt_ids, ex.teacher_ids])) == full


def test_alpaca_render(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Name a colour.", "teacher_response": "Blue."},
        {"messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x"},
                      {"role": "user", "content": "Last one."}], "teacher_response": "Ok."}])
    ds = build_dataset([path], DataConfig(template="alpaca"), tok)
    want = ALPACA_TEMPLATE.format(prompt="Name a colour.")
    assert want.startswith("Below is an instruction") and want.endswith("### Response:\n")
    assert tok.decode(ds[0].prompt_ids) == "<bos>" + want  # the tokenizer adds its BOS
    assert tok.decode(ds[1].prompt_ids) == "<bos>" + ALPACA_TEMPLATE.format(prompt="Last one.")
    assert tok.decode(ds[0].teacher_ids) == "Blue.<eos>"


def test_tiny_test_tokenizer_boundary_is_exact(tmp_path):
    # A word-level tokenizer built here: prompt and answer are tokenised separately, so a
    # word split across the boundary stays split (no merge across it).
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[END]", "[PAD]", "User:", "Bot:", "hi", "there"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="[END]", pad_token="[PAD]", unk_token="[UNK]",
        chat_template="{% for m in messages %}User: {{ m['content'] }} {% endfor %}Bot:")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "teacher_response": "there hi"}])
    ds = build_dataset([path], DataConfig(), hf)
    assert ds[0].prompt_ids.tolist() == [3, 5, 4]
    assert ds[0].teacher_ids.tolist() == [6, 5, 1]
    assert eos_id(hf, "[PAD]") == 2 and pad_id(hf) == 2
    with pytest.raises(DataError, match="not a single token"):
        eos_id(hf, "nope")


def long_rows(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [
        {"id": "short", "prompt": "hi", "teacher_response": "ok"},  # prompt 6 tokens, answer 3
        {"id": "longp", "prompt": "x" * 30, "teacher_response": "ok"},  # prompt 34 tokens
        {"id": "longr", "prompt": "hi", "teacher_response": "abcdefghij"},  # answer 11 tokens
    ])


def test_length_policy_truncate(tmp_path, tok):
    path = long_rows(tmp_path)
    cfg = DataConfig(max_prompt_len=20, prompt_len_policy="truncate", max_response_len=6,
                     response_len_policy="truncate")
    ds = build_dataset([path], cfg, tok)
    assert ds.keys == ["short", "longp", "longr"]
    # Prompt keeps its end (the question and the generation prompt).
    assert tok.decode(ds[1].prompt_ids) == "x" * 18 + "<eos><|assistant|>"
    # Answer keeps its start; by default no EOS is invented for a cut answer.
    assert tok.decode(ds[2].teacher_ids) == "abcdef"
    assert dict(ds.stats.length) == {"prompt_truncated": 1, "response_truncated": 1}
    ds = build_dataset([path], cfg.replace(keep_eos_on_truncate=True), tok)
    assert tok.decode(ds[2].teacher_ids) == "abcde<eos>"


def test_length_policy_skip(tmp_path, tok):
    path = long_rows(tmp_path)
    cfg = DataConfig(max_prompt_len=20, prompt_len_policy="skip", max_response_len=6,
                     response_len_policy="skip")
    ds = build_dataset([path], cfg, tok)
    assert ds.keys == ["short"]
    assert dict(ds.stats.length) == {"prompt_skipped": 1, "response_skipped": 1}
    assert ds.stats.files[path].kept == 1 and ds.stats.ok


def test_length_policy_error(tmp_path, tok):
    path = long_rows(tmp_path)
    with pytest.raises(DataError) as exc:
        build_dataset([path], DataConfig(max_prompt_len=20), tok)
    assert str(exc.value) == (f"{path} row 2, field 'prompt': 34 tokens > max_prompt_len 20 "
                              "(prompt_len_policy=error)")
    with pytest.raises(DataError, match=r"row 3, field 'teacher_response': 11 tokens > "
                                        r"max_response_len 6"):
        build_dataset([path], DataConfig(max_response_len=6), tok)
    # Validation counts instead of stopping.
    stats = validate_files([path], DataConfig(max_prompt_len=20, max_response_len=6), tok)
    assert dict(stats.length) == {"prompt_too_long": 1, "response_too_long": 1}
    assert stats.kept == 1 and not stats.ok and len(stats.files[path].messages) == 2


def test_chat_template_required_for_chat(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {"[UNK]": 0, "[END]": 1}, unk_token="[UNK]")), eos_token="[END]", unk_token="[UNK]")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "teacher_response": "ok"}])
    with pytest.raises(DataError, match="no chat_template"):
        build_dataset([path], DataConfig(), hf)
    assert len(build_dataset([path], DataConfig(template="alpaca"), hf)) == 1
