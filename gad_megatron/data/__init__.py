"""Teacher-answer files -> checked rows -> token ids -> group-aware batches.

    cfg = load_data_config("configs/data_task.yaml")
    tok = load_tokenizer(cfg.tokenizer or "builtin")
    ds = build_dataset(cfg.train_files, cfg, tok)          # validates every row first
    loader = GroupLoader.from_config(ds, cfg)
    batch = loader.next_batch()
    batch.prompts(pad_id(tok), n_samples=4)                # left-padded generation input
    batch.teacher_packed(pad_id(tok))                      # THD-packed + cu_seqlens

See docs/data.md for the row format, the policies and the built-in task.
"""

from gad_megatron.data.batching import (
    Batch, GroupLoader, PackedBatch, PaddedBatch, PromptGroup, pack_sequences, pad_sequences,
)
from gad_megatron.data.config import DataConfig, DataError, load_data_config
from gad_megatron.data.dataset import Example, TokenDataset, build_dataset, validate_files
from gad_megatron.data.encode import ALPACA_TEMPLATE, Encoder
from gad_megatron.data.readers import Row, check_record, iter_rows
from gad_megatron.data.stats import BAD_KINDS, LENGTH_EVENTS, BadRow, DataStats, FileStats
from gad_megatron.data.tokenizer import build_builtin_tokenizer, eos_id, load_tokenizer, pad_id

__all__ = [
    "ALPACA_TEMPLATE", "BAD_KINDS", "LENGTH_EVENTS", "BadRow", "Batch", "DataConfig",
    "DataError", "DataStats", "Encoder", "Example", "FileStats", "GroupLoader", "PackedBatch",
    "PaddedBatch", "PromptGroup", "Row", "TokenDataset", "build_builtin_tokenizer",
    "build_dataset", "check_record", "eos_id", "iter_rows", "load_data_config",
    "load_tokenizer", "pack_sequences", "pad_id", "pad_sequences", "validate_files",
]
