"""Built-in demo models (``digits``, ``minilm``, ``resnet50``), all built offline.

Each module holds one source class; the registry in :mod:`builder.sources` imports them lazily.
"""
