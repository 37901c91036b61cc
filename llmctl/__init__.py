"""llmctl: raw documents to an evaluated language model, one CLI command per stage."""

__version__ = "0.1.0"
