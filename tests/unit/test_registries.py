"""The plug-in registries: protocols (how server and clients talk) and tasks (what a run learns)."""

from __future__ import annotations

import pytest

from fedcustom.config import build_config
from fedcustom.errors import ConfigError, FedCustomError
from fedcustom.methods import get_method, method_names
from fedcustom.protocols import get_protocol, message_kinds, protocol_names, protocol_of, require_server_features
from fedcustom.tasks import get_task, task_names


def test_every_method_speaks_a_registered_protocol_whose_plugin_builds_both_sides() -> None:
    for name in method_names():
        plugin = protocol_of(get_method(name)).plugin()
        assert callable(plugin.build_server) and callable(plugin.build_client) and callable(plugin.client_model)
    assert set(protocol_names()) == {"parameter_sharing", "split", "distill"}
    assert len(message_kinds()) == len(set(message_kinds()))  # no two protocols claim one kind


def test_an_unknown_protocol_and_server_features_on_the_wrong_protocol_are_clear_errors() -> None:
    with pytest.raises(FedCustomError, match="protocol 'gossip': expected one of distill, parameter_sharing, split"):
        get_protocol("gossip")
    with pytest.raises(FedCustomError, match=r"--scaffold: apply to the parameter-sharing methods \(full, head, lora"):
        require_server_features(["--scaffold"], get_method("split"))
    require_server_features(["--scaffold"], get_method("lora"))  # no error


def test_each_task_declares_its_metrics_length_and_peft_type_and_the_cli_offers_exactly_them() -> None:
    from peft import TaskType

    for name in task_names():
        task = get_task(name)
        assert task.metrics and task.headline_metric == task.metrics[0][0]
        if task.default_max_length is not None:  # tasks with tokens (images have none)
            assert task.default_max_length > 0
        if task.peft_task_type is not None:  # None: PEFT's plain PeftModel (images)
            TaskType(task.peft_task_type)  # a real PEFT task type
        assert build_config({"model": {"task": name}}).model.max_length == task.default_max_length
    with pytest.raises(ConfigError, match="causal-lm"):
        build_config({"model": {"task": "image"}})
    with pytest.raises(FedCustomError, match="task 'image': expected one of causal-lm, classification, "
                                             "image-classification"):
        get_task("image")
