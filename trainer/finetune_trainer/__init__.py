"""finetune_trainer: runs one FineTuneJob spec — data from S3, a pretrained backbone, the declared
freeze / learning-rate policy, checkpoints, outputs and Prometheus metrics."""
