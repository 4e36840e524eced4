"""Package data: the lineage calibration (lineage_calibration.json, written by bench/calibrate.py)."""
