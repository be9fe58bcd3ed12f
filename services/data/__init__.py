"""The data service: ingest, preprocess, version and stream datasets."""
