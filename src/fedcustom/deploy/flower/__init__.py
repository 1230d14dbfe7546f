"""fedcustom as a Flower app: :mod:`.apps` holds the ServerApp and ClientApp, :mod:`.node` builds one data owner's
client (through the job assembler) and keeps its state between messages, :mod:`.sim` runs the apps on Flower's
simulation engine, :mod:`.submit` packages and submits a run to a SuperLink. Above the runner (the ServerApp runs a
job); below it only the carrier, :mod:`fedcustom.runtime.flower`.
"""
