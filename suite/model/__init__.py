"""A model's anatomy: prunable structure, masks, gates, compaction, checkpoints, loading."""
