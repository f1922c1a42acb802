"""What a run leaves: the run record and its metrics, plots and TensorBoard logs."""
