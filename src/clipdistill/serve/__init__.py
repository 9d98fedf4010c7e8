"""Serve an exported model: embeddings, FAISS index, torch-free search and the HTTP service.

Importing this package (and ``serve.search``) never imports torch; only the torch backend of
``serve.embed`` (embedding with a model spec instead of an export) does, inside a function. The
export itself (torch -> ONNX, open_clip folders) is the ``clipdistill.export`` package.
"""

from clipdistill.serve.search import Hit, QueryError, Searcher

__all__ = ["Hit", "QueryError", "Searcher"]
