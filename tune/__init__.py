"""Fine-tuning and merging the checkpoints the proxy serves: LoRA supervised fine-tuning on
examples rendered exactly as the proxy will serve them (`ptst tune`), and merges of a fine-tune
with its aligned base on MergeKit (`ptst merge`)."""
