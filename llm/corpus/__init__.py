"""Raw corpus -> clean corpus: source readers, ingest, cleaning filters, table schemas."""
