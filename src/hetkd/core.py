"""Import the core's subpackages whole, in one fixed order.

In a Flower simulation the ServerApp and the ClientApp are imported by two
threads of one process. ``from hetkd.distill.losses import ...`` takes the lock
of ``hetkd.distill.losses`` *before* running ``hetkd/distill/__init__.py``, so
one thread entering a subpackage through one submodule and the other through
another can each hold a lock the other needs; Python then breaks the deadlock
by handing out a half-initialised module (``ImportError: ... partially
initialized module``). The Flower-side packages (:mod:`hetkd.clients`,
:mod:`hetkd.strategies`, :mod:`hetkd.simulations`) import this module first:
the core never imports them, so whichever thread comes second just waits.
"""

import hetkd.data  # noqa: F401
import hetkd.distill  # noqa: F401
import hetkd.models  # noqa: F401
