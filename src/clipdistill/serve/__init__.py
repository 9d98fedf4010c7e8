"""Deploy a trained model: ONNX export, embeddings, FAISS index, torch-free search.

Importing this package (and ``serve.search``) never imports torch; only ``serve.export`` and
the torch backend of ``serve.embed`` do, and only inside functions.
"""

from clipdistill.serve.search import Hit, QueryError, Searcher

__all__ = ["Hit", "QueryError", "Searcher"]
