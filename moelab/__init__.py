"""moelab: compress Mixture-of-Experts language models by pruning and merging experts.

Modules by role: data (offline corpora and calibration sets), zoo (the embedded trained MoE and
loading), kernels (a fast experts kernel with observation hooks), models (one adapter over every
transformers MoE family), observe, scores, merge, evaluate, plots, io.
"""

__version__ = "0.1.0"
