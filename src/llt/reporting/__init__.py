"""Reports, plots and run listings, made from the records runs leave behind (no model is run)."""
