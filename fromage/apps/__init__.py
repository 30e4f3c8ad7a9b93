"""Applications built on the pipeline: indexing, feature extraction, chat, transcripts, demos, the server."""
