"""The data stage: sources -> de-duplicated, split documents -> token shards.

- `sources`: reading each kind of source as a stream of documents.
- `split`: digests, de-duplication, the byte cap, the train/search/test split, pieces.
- `tokenizer`: the pool's tokenizer (training a BPE, loading, saving, BOS/EOS).
- `shards`: the token shard format, its writers and readers, the training sampler.
- `workers`: the worker processes (``--workers``).
- `prepare`: a pool's data preparation, streaming, with resume.

Decontamination rules live in `merge_mix.decontaminate`; target sets in
`merge_mix.targets`.
"""
