"""Embedded default text corpus (train.jsonl, validation.jsonl); rebuild with ``python -m currsearch.corpus.build``."""
