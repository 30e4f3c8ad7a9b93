"""The image index: FAISS build and search, the on-disk store and its recovery, row storage."""

from .store import BadIndex, ImageIndex, brute_force_search, recover

__all__ = ["BadIndex", "ImageIndex", "brute_force_search", "recover"]
