"""Former home of source reading and splitting; kept so existing imports work.

The code lives in `merge_mix.data.sources` and `merge_mix.data.split`.
"""

from merge_mix.data.sources import (
    SKIP_REASONS,
    dependency_files,
    domain_documents,
    skipped_sentence,
    source_documents,
)
from merge_mix.data.split import (
    SPLITS,
    DomainCorpus,
    build_domain,
    check_corpus,
    cut_pieces,
    document_pieces,
    heldout_role,
    is_heldout,
    read_domain,
    split_domain,
    text_hash,
)

__all__ = [
    "SKIP_REASONS",
    "SPLITS",
    "DomainCorpus",
    "build_domain",
    "check_corpus",
    "cut_pieces",
    "dependency_files",
    "document_pieces",
    "domain_documents",
    "heldout_role",
    "is_heldout",
    "read_domain",
    "skipped_sentence",
    "source_documents",
    "split_domain",
    "text_hash",
]
