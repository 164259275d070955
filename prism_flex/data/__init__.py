"""Data for the examples, benchmarks and accuracy evaluation: the GGUF models shipped in PyPI
wheels (:mod:`prism_flex.data.models`) and Jane Austen's novels (:mod:`prism_flex.data.texts`).

Standard library only; never imported by ``import prism_flex``.
"""
