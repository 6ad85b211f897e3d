"""Images in: discovery, safe decoding, patch grids, prefetching and batching."""
