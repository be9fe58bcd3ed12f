"""Training service (SubmitTrainingJob) and the DDP training worker."""
