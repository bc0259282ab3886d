"""currsearch: estimate the effect of training-sample orders on a language model.

Train once on a reference order, record the trajectory, and estimate the losses of any
other order from that record (arXiv 2505.22042, "FUT") instead of retraining.
"""

__version__ = "0.1.0"
