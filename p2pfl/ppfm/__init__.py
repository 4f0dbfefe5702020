"""PPFM meta-levels (pure, over the core): clustering of update fingerprints, cluster and global
overlays, and one peer's cluster and global gossip levels."""
