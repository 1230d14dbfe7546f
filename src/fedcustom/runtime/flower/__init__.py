"""The Flower runtime: the only package that imports ``flwr`` (install with ``pip install fedcustom[flower]``).

:mod:`.records` translates our messages to Flower's RecordDicts, :mod:`.runtime` is the Runtime our
servers drive on a Flower Grid, :mod:`.apps` holds the ServerApp and ClientApp, and :mod:`.sim` runs
them on Flower's simulation engine.
"""
