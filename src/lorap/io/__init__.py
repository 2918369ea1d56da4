"""Reading and writing: models (models.py, default_model.py), checkpoints (checkpoint.py,
shards.py, files.py), text corpora and instruction data (data.py, instructions.py), the network."""
