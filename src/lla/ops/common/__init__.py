"""Helpers shared by the mechanisms' KV-cache paths (``kvcache.py``: cache writes, gathers, and the chunked
reads of the single-token steps)."""

from .kvcache import append_to_cache, cache_chunk, chunk_keys, chunk_parts, gather_cache, pack_cache, stage_chunk, visible_span

__all__ = ["append_to_cache", "cache_chunk", "chunk_keys", "chunk_parts", "gather_cache", "pack_cache", "stage_chunk", "visible_span"]
