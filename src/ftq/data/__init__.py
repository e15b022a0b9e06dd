"""Data: dataset registry, readers, format normalizers and validation, tokenization, collation."""
