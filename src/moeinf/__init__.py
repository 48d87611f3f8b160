"""moeinf: run Mixture-of-Experts models on small machines with a sparsity-aware expert cache."""

__version__ = "0.1.0"
