"""`lorap bench`: dense and compressed side by side, timed interleaved (timing.py), on models built
from shapes with random weights or from real checkpoints (models.py); run.py is the command's job."""
