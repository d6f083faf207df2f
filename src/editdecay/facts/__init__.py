"""Facts: records, loaders, stop words, relation table, selection."""

from .stopwords import is_stop_text, load_stopwords, stopwords_hash

__all__ = ["is_stop_text", "load_stopwords", "stopwords_hash"]
