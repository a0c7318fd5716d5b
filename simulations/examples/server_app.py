"""Flower's quickstart ``ServerApp``, with one line changed: ``SDDist`` in place of ``FedAvg``.

Compare with ``flwr new``'s PyTorch template: the run config is read the same
way and ``strategy.start(grid=..., ...)`` is called the same way. ``SDDist``
with only the class count runs the settings ``hetkd run strategy=sd-dist``
uses (``SDDist.paper(...)`` gives the paper's); the reference set's size is
learnt from the devices at set-up, and ``train_config``'s ``lr`` reaches every
device's optimizer. SD-Dist keeps no global model (each device keeps its own
personalised one), so ``result.arrays`` comes back empty, not as the untrained
``initial_arrays``, and the strategy's last log line says where the devices'
models are; ``result`` holds every round's metrics. With ``FedDF`` or ``MEKD``
(``student=Net()``), ``result.arrays`` is the trained global student.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from hetkd.simulations.examples.task import NUM_CLASSES, Net
from hetkd.strategies import SDDist

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize the strategy: the one line that differs from the quickstart's
    # `strategy = FedAvg(fraction_train=fraction_train)`
    strategy = SDDist(fraction_train=fraction_train, num_classes=NUM_CLASSES)

    # Start strategy, run SD-Dist for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )

    # Print the devices' accuracy per round (SD-Dist has no global model to save)
    for server_round, metrics in result.evaluate_metrics_clientapp.items():
        print(f"round {server_round}: personalised accuracy {metrics['personalised-accuracy-mean']:.3f}")
