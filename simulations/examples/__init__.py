"""Examples of plugging hetkd into Flower code of your own (``flwr run simulations/examples``).

* :mod:`.task` stands for a user's existing code: a PyTorch model (``Net``) and
  data loaders, written without hetkd.
* :mod:`.client_app` turns them into SD-Dist/MEKD devices with
  :func:`hetkd.clients.make_client_app`.
* :mod:`.server_app` is Flower's quickstart ``ServerApp`` with one line changed:
  ``strategy = SDDist(...)`` in place of ``strategy = FedAvg(...)``.
"""
