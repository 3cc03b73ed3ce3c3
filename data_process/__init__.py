"""The data pipeline: recipe -> readers -> clean -> dedup -> tokenize -> stage.

`python data_process.py` (the script beside this package) is the entry point; this package holds the
pieces, one concern per module (recipe.py, records.py, readers.py, clean.py, pipeline.py, dedup.py, ...).
"""
