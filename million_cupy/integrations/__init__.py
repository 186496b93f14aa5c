"""Optional integrations with other frameworks (each needs its own extra; the core library imports none).

* :mod:`million_cupy.integrations.transformers`: Hugging Face ``transformers`` models decode through the PQ
  cache (extra ``hf``: ``pip install -e ".[hf]"``, plus PyTorch).
"""
