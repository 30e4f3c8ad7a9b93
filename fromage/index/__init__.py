"""The image index: FAISS build and search (search.py), the on-disk store and its recovery
(store.py), row storage (jsonl_rows.py, row_blocks.py). Imports nothing from the package above it."""

from .search import brute_force_search
from .store import BadIndex, ImageIndex, recover

__all__ = ["BadIndex", "ImageIndex", "brute_force_search", "recover"]
