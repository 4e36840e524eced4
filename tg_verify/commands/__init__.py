"""One module per CLI verb; cli.py discovers them. Each turns library results into output."""
