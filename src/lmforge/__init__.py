"""lmforge: the life of a language model as orchestrated, observable, repeatable work."""

__version__ = "0.1.0"
