"""raydpo: Ray-based preference optimisation for LLM recommenders.

The package is layered: a pure core (``raydpo.data``, ``raydpo.evaluation``) that runs
without Ray, and thin Ray layers on top.
"""

__version__ = "0.1.0"
