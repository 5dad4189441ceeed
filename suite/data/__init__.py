"""Text sources, calibration batches and the embedded tasks."""
