"""The wire protocol between hetkd strategies and devices: one typed message per exchange.

Every action is a pair of frozen dataclasses (:mod:`hetkd.protocol.messages`):
a :class:`Request` the server sends and the :class:`Reply` a device answers
with. :mod:`hetkd.protocol.wire` turns them into Flower records and back,
with required fields, no fallbacks, and a :class:`ProtocolError` naming the
field for anything missing, unknown or of the wrong type. Strategies (server
side) and the ClientApp (device side) both speak only these types, so a
setting's wire form is its field and nothing else; the reply types are the
allow-list of what may leave a device (:data:`DEVICE_TO_SERVER`).
"""

from hetkd._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "hetkd.protocol.messages": (
        "ANSWER_MODELS", "DEVICE_TO_SERVER", "REQUESTS", "EnsembleDistill", "EvaluateReply", "EvaluateRequest",
        "FedAvgReply", "FedAvgRequest", "LocalTrainRequest", "Population", "QueryAnswers", "ReferenceDistill",
        "ReferencePredictions", "SetupReply", "SetupRequest", "Targets", "TrainReply", "TrainRequest",
    ),
    "hetkd.protocol.wire": (
        "ARRAYS", "CONFIG", "METRICS", "ProtocolError", "Reply", "Request", "StateDict", "WireMessage",
    ),
})
