"""Former home of the tokenizer and token shards; kept so existing imports work.

The code lives in `merge_mix.data.tokenizer` (training, loading, saving, BOS/EOS) and
`merge_mix.data.shards` (the shard format, `Shard`, `write_shard`, `MixtureSampler`).
"""

from merge_mix.data.shards import MixtureSampler, Shard, write_shard
from merge_mix.data.tokenizer import (
    BOS,
    EOS,
    encode_pieces,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    token_dtype,
    train_tokenizer,
)

__all__ = [
    "BOS",
    "EOS",
    "MixtureSampler",
    "Shard",
    "encode_pieces",
    "load_tokenizer",
    "save_tokenizer",
    "special_ids",
    "token_dtype",
    "train_tokenizer",
    "write_shard",
]
