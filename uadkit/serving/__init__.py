"""HTTP service: `uadkit --serve --pipeline anomaly_detection --model_dir DIR`."""
