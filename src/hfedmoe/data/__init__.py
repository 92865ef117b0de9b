"""The data layer: corpora with a fixed split, client partitions, tokenisation, batches."""

from hfedmoe.data.corpora import Corpus, DataError, TextDataset, load_corpus
from hfedmoe.data.instructions import (
    IGNORE_INDEX,
    CausalLMSet,
    InstructionPair,
    tokenize_instructions,
)
from hfedmoe.data.partition import (
    client_split,
    client_split_sizes,
    client_test_size,
    client_train_set,
    dirichlet_partition,
    iid_partition,
    label_histogram,
    partition_indices,
    pathological_partition,
)
from hfedmoe.data.tokenize import (
    TokenizedSet,
    batches,
    drop_untokenizable,
    eval_batches,
    load_tokenizable_corpus,
    tokenize,
)

__all__ = [
    "IGNORE_INDEX",
    "CausalLMSet",
    "Corpus",
    "DataError",
    "TextDataset",
    "TokenizedSet",
    "batches",
    "client_split",
    "client_split_sizes",
    "client_test_size",
    "client_train_set",
    "dirichlet_partition",
    "eval_batches",
    "iid_partition",
    "InstructionPair",
    "label_histogram",
    "drop_untokenizable",
    "load_corpus",
    "load_tokenizable_corpus",
    "partition_indices",
    "pathological_partition",
    "tokenize",
    "tokenize_instructions",
]
