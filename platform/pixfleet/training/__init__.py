"""ControlNet fine-tuning on Ray Train: data ingest, the per-worker loop, strategies, the driver."""
