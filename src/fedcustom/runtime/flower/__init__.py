"""The Flower carrier: our messages on a Flower Grid (install with ``pip install fedcustom[flower]``).

:mod:`.records` translates our messages to Flower's RecordDicts, :mod:`.runtime` is the Runtime our servers drive
on a Flower Grid, :mod:`.secaggplus` runs a secure-aggregation round through Flower's SecAgg+. The Flower apps
that use it (ServerApp, ClientApp, a node's client, simulation and submission) live above the runner, in
:mod:`fedcustom.deploy.flower`. These two packages are the only ones that import ``flwr``.
"""
