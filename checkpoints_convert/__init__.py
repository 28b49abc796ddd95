"""checkpoints_convert."""
