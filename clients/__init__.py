"""Devices: :class:`DistillClient` (one device's model, data and optimizer), the
state stores that keep it between rounds, the handlers that answer each typed
request of :mod:`hetkd.protocol`, and the Flower ``ClientApp`` that routes
messages to them (:data:`hetkd.clients.app.app`, devices from hetkd's data and
model zoo; :func:`make_client_app`, devices from a model and data of your
own). A node's ``--node-config`` keys are checked by :func:`parse_node_config`.
"""

from hetkd._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "hetkd.clients.custom": ("DeviceDataset", "make_client_app",),
    "hetkd.clients.device": ("DistillClient",),
    "hetkd.clients.node_config": ("NodeConfig", "NodeConfigError", "parse_node_config",),
    "hetkd.clients.state": ("ContextStateStore", "DiskStateStore", "StateStore",),
})
