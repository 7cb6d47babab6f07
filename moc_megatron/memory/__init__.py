"""The Mixture-of-Chapters memory: the bank of chapter tokens, the router, the dispatch of routed chapters
over expert-parallel ranks, chapter attention, and the memory cross-attention layer."""
