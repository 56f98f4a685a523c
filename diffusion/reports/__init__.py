"""What runs and sweeps leave to read: sweep reports, tables, plots, image grids and GIFs."""
