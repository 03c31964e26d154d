"""Great Expectations suites of the validate stage (corpus) and the tokenize stage (datasets).

``gx_suite`` runs a list of named expectations on a DataFrame in one file-backed GX context in the
workspace (so Data Docs are written there); ``corpus`` and ``tokenized`` build the frames, with
derived columns (PII left, overlap with evaluation sets, label masking) that GX then checks.
"""
