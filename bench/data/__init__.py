"""Data benchmarks on a CPU: local-file collection (``collect_local``), a loopback crawl under
politeness limits (``collect_crawl``) and curation against datatrove (``curate_datatrove``)."""
