"""Curation steps: cleaning, quality and language filters, dedup, PII scrubbing, classic NLP (see curate.py)."""
