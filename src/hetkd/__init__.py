"""hetkd: federated learning across heterogeneous devices by knowledge distillation.

Devices keep their own model architectures; knowledge moves between them as
predictions (SD-Dist, MEKD), never by averaging weights. The core package holds
data, models, distillation math, settings and the wire protocol
(:mod:`hetkd.protocol`); the Flower parts live in :mod:`hetkd.clients`,
:mod:`hetkd.strategies` and :mod:`hetkd.simulations`. Packages import their
modules lazily (:mod:`hetkd._exports`), so two threads can import any of
them at once.
"""

__version__ = "0.1.0"
