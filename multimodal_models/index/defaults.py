"""Default settings of two-stage search, in a module without torch: the CLI's parser and the
server's request schemas read them, and `multimodal --help` should not wait for torch."""

DEFAULT_TOP = 10  # how many of the dual encoder's best images the reranker rescores per text
# weight of the dual encoder's cosine added to the LM's log-likelihood; chosen on Shapes val
# (0 / 10 / 20 / 50: R@1 32.04 / 33.26 / 33.44 / 32.80)
DEFAULT_SIMILARITY_WEIGHT = 20.0
