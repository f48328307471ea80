"""Training data: token shards on disk and the packed, document-aware loader."""

from herd.data.loader import Batch, PackedLoader
from herd.data.shards import Shard, load_shards, tokenize_corpus

__all__ = ["Batch", "PackedLoader", "Shard", "load_shards", "tokenize_corpus"]
