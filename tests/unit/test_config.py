"""Config loading, validation and the CLI's one-line errors (exit code 2, no traceback)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedcustom.cli import main
from fedcustom.config import ConfigError, build_config, load_config, parse_partition


def test_toml_file_and_overrides_merge(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "job.toml"
    path.write_text('[method]\nname = "lora"\nlora_r = 4\n[federation]\nclients = 7\nrounds = 3\n')
    # Execute
    cfg = load_config(path, {"federation": {"rounds": 9}, "method": {"lora_targets": "query,value"}})
    # Assert
    assert (cfg.method.name, cfg.method.lora_r, cfg.federation.clients, cfg.federation.rounds) == ("lora", 4, 7, 9)
    assert cfg.method.lora_targets == ("query", "value")


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"federation": {"clientz": 3}}, "unknown config key federation.clientz"),
        ({"fed": {"clients": 3}}, "unknown config section [fed]"),
        ({"federation": {"clients": "ten"}}, "federation.clients: expected int"),
        ({"federation": {"clients": 0}}, "federation.clients"),
        ({"federation": {"fraction": 1.5}}, "fraction"),
        ({"train": {"centralized": "yes"}}, "expected true or false"),
        ({"data": {"partition": "dirichlet:0"}}, "ALPHA must be a finite number > 0"),
        ({"data": {"partition": "zipf"}}, "expected iid, dirichlet:ALPHA"),
    ],
)
def test_bad_config_values_are_named(values: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        build_config(values)
    assert fragment in str(info.value)


def test_partition_specs_parse() -> None:
    assert parse_partition("iid").kind == "iid"
    assert parse_partition("dirichlet:0.1").param == 0.1
    assert parse_partition("shards:2").param == 2
    assert parse_partition("quantity:1").kind == "quantity"
    with pytest.raises(ConfigError):
        parse_partition("shards:1.5")


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def base_args(tiny_bert: str, toy_csv: str, tmp_path: Path) -> list[str]:
    return ["run", "--model", tiny_bert, "--dataset", toy_csv, "--clients", "2", "--rounds", "1",
            "--output", str(tmp_path / "out"), "--quiet"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--method", "adapterdrop"], "method 'adapterdrop': expected one of distill, full, head, lora, prefix, prompt, split"),
        (["--model", "no-such-model-xyz"], "model 'no-such-model-xyz'"),
        (["--dataset", "missing.csv"], "dataset file missing.csv: not found"),
        (["--dataset", "no_such_hub_dataset_xyz"], "dataset 'no_such_hub_dataset_xyz'"),
        (["--text-column", "review_body"], "text column 'review_body' is not in dataset"),
        (["--label-column", "stars"], "label column 'stars' is not in dataset"),
        (["--partition", "dirichlet:-1"], "ALPHA must be a finite number > 0"),
        (["--clients", "100000"], "more clients than the"),
        (["--strategy", "fedmagic"], "strategy 'fedmagic'"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(capsys, base_args: list[str], extra: list[str], fragment: str) -> None:
    assert fragment in _cli_error(capsys, base_args + extra)


def test_cli_unwritable_output(capsys, base_args: list[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _cli_error(capsys, base_args + ["--output", str(blocker / "sub")])
    assert "output directory" in err and "not writable" in err


def test_cli_unknown_toml_key(capsys, base_args: list[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    assert "unknown config key train.learning_rate" in _cli_error(capsys, base_args + ["--config", str(path)])


def test_cli_runs_and_writes_summary(base_args: list[str], tmp_path: Path) -> None:
    import json

    assert main(base_args + ["--method", "lora", "--centralized"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("method", "rounds", "final_accuracy", "centralized_accuracy", "bytes_up_per_round",
                "bytes_down_per_round", "client_flops_per_round", "trainable_params"):
        assert summary[key] is not None, key
    assert summary["method"] == "lora" and summary["rounds"] == 1
    assert summary["client_flops_per_round"] > 0
    epochs = summary["settings"]["local_epochs"]  # the method's recommended count (no --local-epochs given)
    assert summary["centralized"]["examples_seen"] == epochs * sum(c["examples"] for c in summary["client_data"])


def test_codec_flags_parse_and_bad_chains_exit_2(capsys, tmp_path) -> None:
    from fedcustom.cli import main

    assert main(["run", "--method", "prefix", "--codec", "delta,int8,topk:0.1"]) == 2
    assert "codec.up (--codec) 'delta,int8,topk:0.1': 'topk:0.1' is out of order" in capsys.readouterr().err
    assert main(["run", "--method", "split", "--codec", "int8", "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert "codec chains apply to parameter-sharing methods" in capsys.readouterr().err


def test_per_method_tables_set_the_same_settings_as_the_flat_keys(tmp_path) -> None:
    # Prepare: one TOML with per-method tables, one with the flat keys they stand for
    nested = tmp_path / "nested.toml"
    nested.write_text('[method]\nname = "lora"\n[method.lora]\nr = 4\nalpha = 8\ntargets = ["query"]\n'
                      '[method.prefix]\nnum_virtual_tokens = 10\ninit = "vocab"\n[method.split]\ncut_layer = 2\n')
    flat = tmp_path / "flat.toml"
    flat.write_text('[method]\nname = "lora"\nlora_r = 4\nlora_alpha = 8\nlora_targets = ["query"]\n'
                    'num_virtual_tokens = 10\nprefix_init = "vocab"\ncut_layer = 2\n')
    # Execute / Assert: the same config; checkpoints and summaries keep the flat keys
    assert load_config(nested) == load_config(flat)
    assert load_config(nested).to_dict()["method"]["lora_r"] == 4


@pytest.mark.parametrize("toml, expected", [
    ('[method.lora]\nrank = 4\n', "unknown config key method.lora.rank; expected one of: r, alpha, dropout, targets"),
    ('[method.adapter]\nr = 4\n', "unknown config table [method.adapter]"),
    ('[method]\nlora_r = 8\n[method.lora]\nr = 4\n', "method.lora.r = 4 and method.lora_r = 8 set the same setting"),
])
def test_per_method_table_mistakes_are_named(tmp_path, toml: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the configs name files relative to the repository root, as the README runs them
    from fedcustom.assemble import check_runtime_support

    monkeypatch.chdir(path.parents[1])
    check_runtime_support(load_config(path))


def test_a_run_that_does_not_count_flops_records_none_not_zero(base_args: list[str], tmp_path: Path) -> None:
    import json

    assert main(base_args + ["--method", "lora", "--no-count-flops", "--no-report"]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["client_flops_per_round"] is None
