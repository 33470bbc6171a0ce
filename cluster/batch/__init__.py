"""Offline batch generation over a JSONL file (`cluster/batch/job.py`); `python -m cluster.batch` runs it."""
