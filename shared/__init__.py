"""clusterlens core library: settings, storage, encoders, index, search, ingest and embedding."""

__version__ = "0.1.0"
