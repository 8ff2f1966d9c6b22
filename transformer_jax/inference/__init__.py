"""Decoding and serving: search, the Translator API, BLEU, export."""
