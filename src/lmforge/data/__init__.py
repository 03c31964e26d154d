"""Data every stage shares: documents, the hash split, SFT records, packing, tokenized datasets, built-in corpora."""
