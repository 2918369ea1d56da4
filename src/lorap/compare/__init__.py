"""`lorap compare`: several methods side by side under one parameter budget (run.py), and its
table and plot (report.py)."""
