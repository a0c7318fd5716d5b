"""hetkd: federated learning across heterogeneous devices by knowledge distillation.

Devices keep their own model architectures; knowledge moves between them as
predictions (SD-Dist, MEKD), never by averaging weights. The core package holds
data, models, distillation math, configuration and results; the Flower parts
live in :mod:`hetkd.clients`, :mod:`hetkd.strategies` and :mod:`hetkd.simulations`.
"""

__version__ = "0.1.0"
