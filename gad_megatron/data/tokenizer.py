"""Tokenizers: any local Hugging Face tokenizer directory, or the built-in one.

The built-in tokenizer is character-level (printable ASCII, newline, tab, plus special
tokens), built in code with the `tokenizers` library, so the embedded default task runs
with nothing downloaded. It is a normal `PreTrainedTokenizerFast`: `save_pretrained` writes
tokenizer.json / tokenizer_config.json / chat_template.jinja that `AutoTokenizer` reloads.
"""

from __future__ import annotations

import os
from typing import Any

from gad_megatron.data.config import DataError

BUILTIN = "builtin"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
# Ids 0..6 are the special tokens above, then tab, newline, and ASCII 32..126 in order.
CHARACTERS = ("\t", "\n", *(chr(c) for c in range(32, 127)))

# Every turn is `<|role|>text<eos>`; the generation prompt is `<|assistant|>`, so a reply
# ends with the same EOS that closes assistant turns in the history.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('built-in chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def builtin_vocab() -> dict[str, int]:
    """The built-in vocabulary, token -> id (deterministic, 104 entries)."""
    return {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}


def build_builtin_tokenizer():
    """The character-level tokenizer as a `transformers.PreTrainedTokenizerFast`.

    `add_special_tokens=True` prepends `<bos>`; the chat template writes `<bos>` itself, so
    rendered chat prompts are tokenised with `add_special_tokens=False`. Characters outside
    the vocabulary become `<unk>`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = builtin_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # One token per character; [\s\S] also matches newlines, which `.` would not.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE,
        model_max_length=4096, padding_side="right", clean_up_tokenization_spaces=False)


def load_tokenizer(spec: str | os.PathLike) -> Any:
    """`builtin`, or a local HF tokenizer directory (never downloads, no remote code)."""
    spec = os.fspath(spec)
    if spec == BUILTIN:
        return build_builtin_tokenizer()
    if not os.path.isdir(spec):
        raise DataError(f"tokenizer {spec!r}: not 'builtin' and not a local directory")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a bad directory
        raise DataError(f"tokenizer {spec!r}: cannot load ({exc})") from exc
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {spec!r} has no eos_token; set data.eos_token")
    return tok


def eos_id(tokenizer: Any, eos_token: str | None = None) -> int:
    """The id appended to teacher answers: `eos_token` if given, else the tokenizer's EOS."""
    if eos_token is None:
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer has no eos_token; set data.eos_token")
        return int(tokenizer.eos_token_id)
    ids = tokenizer.convert_tokens_to_ids([eos_token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise DataError(f"data.eos_token {eos_token!r} is not a single token of this tokenizer")
    return int(ids[0])


def pad_id(tokenizer: Any) -> int:
    """Padding id: the tokenizer's pad token, else its EOS (masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos_id(tokenizer)
