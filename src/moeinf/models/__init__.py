"""Model architectures: the spec (spec.py, weights.py), per-family adapters (adapters/), the router
(routing.py) and the one generic decoder (transformer.py with attention, moe, rope, layers).

spec, weights and adapters are torch-free; the decoder modules import torch.
"""
