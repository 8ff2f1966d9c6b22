"""Data: the SentencePiece tokenizer, dataset sources (TFDS builders, text files)
and the grain pipeline that batches, packs and resumes."""
