"""The wire protocol between hetkd strategies and devices: action and record names.

Strategies (server side) and the ClientApp (device side) both import these, so
a message type or payload key is spelt in one place. What may cross from a
device to the server is exactly: scalar ``metrics``, the ``device`` facts at
set-up, ``predictions`` on public inputs, and (FedAvg baseline only) ``arrays``.
"""

# message types (Flower: "<category>.<action>")
SETUP = "query.setup"
TRAIN_LOCAL = "train.local"
TRAIN_FEDAVG = "train"
TRAIN_REFERENCE_DISTILL = "train.reference_distill"
TRAIN_ENSEMBLE_DISTILL = "train.ensemble_distill"
EVALUATE = "evaluate"

# record keys
CONFIG = "config"  # ConfigRecord, server -> device
METRICS = "metrics"  # MetricRecord, device -> server
DEVICE = "device"  # ConfigRecord, device -> server at set-up (architecture)
ARRAYS = "arrays"  # ArrayRecord of weights: FedAvg only
TARGETS = "targets"  # ArrayRecord, server -> device: this device's target logits
POPULATION = "population"  # ArrayRecord, server -> device: everyone's predictions (device-side selection)
PREDICTIONS = "predictions"  # ArrayRecord, device -> server: predictions on public inputs
GENERATOR = "generator"  # ArrayRecord, server -> device: G's weights (MEKD), sent when they changed
QUERY_INPUTS = "query-inputs"  # ArrayRecord, server -> device: the query inputs, when smaller than G's weights

# array keys
REFERENCE_LOGITS = "reference-logits"
DEVICE_IDS = "device-ids"
QUALITY = "quality"
INPUTS = "inputs"
RESPONSES = "responses"  # answers on query inputs: log-probabilities (N x C), or class indices (N,) when hard
TARGET_RESPONSES = "target-responses"  # ensemble answers on last round's queries (N x C or N,)

# config-key prefixes of the two queries a message may name (see hetkd.distill.queries.QuerySpec)
QUERY = "query"  # this round's: answer on these inputs
TARGET_QUERY = "target-query"  # last round's: the inputs the targets refer to

# config keys
RUN_CONFIG_YAML = "hetkd-config"
SERVER_ROUND = "server-round"
ANSWER_MODEL = "answer-model"  # ensemble distillation: which of its models a device answers queries with

#: values of ANSWER_MODEL: the device's own model (which also distils from the ensemble), or a
#: private model that trains on the device's private data alone (its answers never echo the ensemble)
ANSWER_MODELS = ("personal", "private")

#: records a device may send to the server, by strategy family
DEVICE_TO_SERVER = {
    "logit-exchange": {METRICS, PREDICTIONS},
    "ensemble-distill": {METRICS, PREDICTIONS},
    "local": {METRICS},
    "setup": {METRICS, DEVICE},
    "fedavg": {METRICS, ARRAYS},
}
