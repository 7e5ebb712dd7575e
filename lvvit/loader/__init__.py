"""Stage 3: the training and eval loaders (shards -> batches), their per-sample transforms and worker set-up."""
