"""Accuracy research on real models (repository only, not installed): recall, perplexity and
pass-key retrieval of Prism against other block estimators; results in bench/results/."""
