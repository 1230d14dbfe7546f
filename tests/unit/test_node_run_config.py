"""What a deployed Flower node takes from the submitted run and what it decides itself."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")
from flwr.app import Context, RecordDict  # noqa: E402

from fedcustom.config import build_config  # noqa: E402
from fedcustom.deploy.flower.apps import config_to_run_config, node_run_config  # noqa: E402


def _context(reproducible_noise: bool, node_config: dict) -> Context:
    cfg = build_config({"privacy": {"dp": "local", "reproducible_noise": reproducible_noise}})
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, **node_config}, state=RecordDict(),
                   run_config=config_to_run_config(cfg))


@pytest.mark.parametrize("submitted", [True, False])
def test_a_node_draws_noise_from_the_os_whatever_the_submitted_run_asks(submitted: bool) -> None:
    cfg = node_run_config(_context(submitted, {}))
    assert cfg.privacy.reproducible_noise is False
    assert cfg.privacy.dp == "local"  # the rest of the run's config is the submitted one


@pytest.mark.parametrize("own", [True, "true", "True"])
def test_only_the_nodes_own_config_asks_for_noise_from_the_run_seed(own: object) -> None:
    assert node_run_config(_context(False, {"reproducible-noise": own})).privacy.reproducible_noise is True
