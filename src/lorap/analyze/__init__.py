"""`lorap analyze`: how low-rank is each projection? spectra.py measures, plots.py draws, run.py is the command's job."""
