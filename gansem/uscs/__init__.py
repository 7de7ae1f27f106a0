"""USCS -- Unsupervised Semantic-Conditional Synthesis (KLiSH Sec. 5).

Modules (each importable on its own):

* :mod:`gansem.uscs.server` -- the painting page: a Flask app around a mask-to-image synthesiser.
"""
