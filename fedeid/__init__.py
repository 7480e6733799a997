"""fedeid: federated, adjustable de-identification of medical images.

Method A (identity blocking + medical-semantics compensation + MDL decoupling) trained
per site and aggregated with Flower; see README.md.
"""

__version__ = "0.1.0"
