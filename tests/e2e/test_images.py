"""Image classification: full fine-tuning, LoRA on convolution and linear layers, and head-only training on tiny
random ViT and ResNet backbones built from config, with the same bytes, FLOPs and partitions as text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedcustom.data.images import FASHION_MNIST_LABELS, load_images
from fedcustom.errors import ConfigError, FedCustomError
from fedcustom.methods import trainable_state
from fedcustom.runner import build_job, execute


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_cnn"])
@pytest.mark.parametrize("method", ["full", "lora", "head"])
def test_each_method_learns_dark_from_light_and_sends_only_what_it_trains(image_config, request, backbone: str,
                                                                          method: str) -> None:
    # Prepare
    job = build_job(image_config(model__name=request.getfixturevalue(backbone), method__name=method))
    trained = trainable_state(job.model)
    everything = dict(job.model.named_parameters())
    # Execute
    summary = execute(job)
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    # Assert: it learns (chance is 0.5), and the payload is exactly the trained tensors
    assert summary["final_accuracy"] >= 0.85, summary["accuracy_per_round"]
    assert log[-1]["eval_loss"] < log[0]["eval_loss"]
    assert job.server.global_state.keys() == trained.keys()
    assert all(log[1]["client_flops"][c] > 0 for c in log[1]["client_flops"])
    if method == "head":
        assert set(trained) == {n for n in everything if n.startswith("classifier")}
    if method == "lora":
        assert any("lora_A" in n for n in trained) and any("classifier" in n for n in trained)
        if backbone == "tiny_cnn":  # the convolutions carry adapters, not only linear layers
            assert any("convolution.lora_A" in n for n in trained)
    if method == "full":
        assert set(trained) == set(everything)
    assert summary["bytes_up_per_round"] > 0


def test_batch_norm_statistics_stay_as_pretrained_while_training(image_config, tiny_cnn: str) -> None:
    job = build_job(image_config(model__name=tiny_cnn, method__name="full", federation__rounds=1))
    before = {k: v.clone() for k, v in job.model.state_dict().items() if "running" in k}
    execute(job)
    after = job.model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())


def test_an_image_folder_loads_in_class_order_and_keeps_the_training_labels(image_folder: str, tmp_path: Path) -> None:
    data = load_images(image_folder)
    assert data.label_names == ["dark", "light"] and len(data) == 160 and sorted(set(data.labels)) == [0, 1]
    (tmp_path / "light").mkdir()
    (tmp_path / "light" / "a.png").write_bytes((Path(image_folder) / "light" / "000.png").read_bytes())
    only_light = load_images(str(tmp_path), label_names=["dark", "light"])
    assert only_light.labels.tolist() == [1]  # a node's own folder keeps the server's label order
    (tmp_path / "zebra").mkdir()
    with pytest.raises(FedCustomError, match="zebra"):
        load_images(str(tmp_path), label_names=["dark", "light"])


def test_fashion_mnist_names_the_debian_package_when_missing(monkeypatch, tmp_path: Path) -> None:
    import fedcustom.data.images as images

    monkeypatch.setattr(images, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FedCustomError, match="apt-get install dataset-fashion-mnist"):
        load_images("fashion-mnist")


def test_methods_an_image_task_cannot_run_are_a_config_error(image_config) -> None:
    for method in ("prefix", "split", "distill"):  # text-only protocols and PEFT prefixes
        with pytest.raises(ConfigError, match="image-classification .* supports full, lora, head, prompt"):
            image_config(method__name=method)


@pytest.mark.integration
def test_packaged_efficientnet_on_fashion_mnist_beats_chance_by_far(tmp_path: Path) -> None:
    from fedcustom.config import build_config
    from fedcustom.runner import run

    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.fail("make setup installs the Debian package dataset-fashion-mnist")
    cfg = build_config({
        "model": {"name": "efficientnet-lite0", "task": "image-classification", "image_size": 64},
        "data": {"dataset": "fashion-mnist", "eval_split": "test", "partition": "dirichlet:1.0",
                 "max_train_examples": 400, "max_eval_examples": 300},
        "method": {"name": "lora"}, "federation": {"clients": 4, "rounds": 2, "local_epochs": 1},
        "train": {"seed": 0}, "output": {"dir": str(tmp_path), "quiet": True, "report": False},
    })
    summary = run(cfg)
    assert summary["label_names"] == FASHION_MNIST_LABELS
    assert summary["final_accuracy"] > 0.6, summary["accuracy_per_round"]  # chance: 0.1


@pytest.mark.parametrize("deep", [False, True])
def test_visual_prompts_learn_travel_alone_with_the_head_and_reload(image_config, deep: bool) -> None:
    from fedcustom.methods.visual_prompt import load_visual_prompts

    # Prepare: 3 prompt tokens on a 2-layer ViT over 16 patches
    job = build_job(image_config(method__name="prompt", method__num_virtual_tokens=3, method__prompt_deep=deep,
                                 train__lr=3e-2))
    lengths = []
    layer = job.model.backbone.vit.layers[1]
    layer.register_forward_pre_hook(lambda _m, args, kwargs: lengths.append(
        (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    # Execute
    summary = execute(job)
    # Assert: the sequence is [CLS] + 3 prompts + 16 patches at every layer; prompts and head are what travels
    assert set(lengths) == {1 + 3 + 16}
    state = job.server.global_state
    assert set(state) == {"prompts", "backbone.classifier.weight", "backbone.classifier.bias"}
    assert state["prompts"].shape == (2 if deep else 1, 3, 32)
    assert summary["final_accuracy"] >= 0.85, summary["accuracy_per_round"]
    # Assert: the saved folder rebuilds the same model
    batch = {"pixel_values": torch.randn(2, 3, 16, 16)}
    job.model.eval()
    reloaded = load_visual_prompts(job.model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, job.model(**batch).logits, rtol=0, atol=1e-6)


def test_deep_prompts_replace_each_layers_prompt_positions(image_config) -> None:
    job = build_job(image_config(method__name="prompt", method__num_virtual_tokens=2, method__prompt_deep=True))
    seen: list[torch.Tensor] = []
    layers = job.model.backbone.vit.layers
    layers[1].register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
    with torch.no_grad():
        job.model(pixel_values=torch.randn(1, 3, 16, 16))
    assert torch.equal(seen[0][0, 1:3], job.model.prompts[1])  # layer 1 sees its own prompts, not layer 0's


def test_visual_prompts_on_a_convolutional_backbone_are_a_clear_error(image_config, tiny_cnn: str) -> None:
    with pytest.raises(FedCustomError, match="ViT-family"):
        build_job(image_config(model__name=tiny_cnn, method__name="prompt"))


def test_the_vision_sweep_reports_each_method_and_split_against_centralized(tiny_vit: str, image_folder: str,
                                                                           tmp_path: Path) -> None:
    import dataclasses

    from rich.console import Console

    from fedcustom.bench import run_sweep_bench
    from fedcustom.bench.sweep import load_sweep, merge

    # Prepare: the shipped sweep, on the tiny ViT and the dark/light folder instead of EfficientNet and Fashion-MNIST
    sweep = load_sweep("vision")
    small = {"model": {"name": tiny_vit, "image_size": None},
             "data": {"dataset": image_folder, "eval_split": None, "max_train_examples": 100, "max_eval_examples": 40,
                      "eval_fraction": 0.25},
             "federation": {"clients": 4, "rounds": 2}, "train": {"batch_size": 16, "count_flops": False},
             "output": {"report": False}}
    sweep = dataclasses.replace(sweep, base=merge(sweep.base, small))
    # Execute
    result = run_sweep_bench(sweep, ".", tmp_path, "fedcustom bench --preset vision", Console(quiet=True))
    # Assert: 3 methods x 2 splits, each with its centralized baseline, a report row and the plot
    records = result["stages"]["report"]
    assert len(records) == 6 and all(r["summary"]["centralized_accuracy"] is not None for r in records)
    text = (tmp_path / "report.md").read_text()
    for method in ("full", "lora", "head"):
        for split in ("iid", "dirichlet0.1"):
            assert f"| {method} | {split} |" in text
    assert (tmp_path / "vision_accuracy.png").is_file() and result["targets"][0]["met"] in (True, False)


def test_a_hub_image_dataset_is_read_by_its_image_and_label_columns(monkeypatch, image_folder: str) -> None:
    """The Hub cannot be reached here: ``datasets.load_dataset`` is replaced by a table of the same shape as a Hub
    image dataset (an Image column and a ClassLabel), which is what the reader sees after a real download."""
    import datasets

    folder = load_images(image_folder)
    table = datasets.Dataset.from_dict(
        {"img": folder.images[:6], "label": folder.labels[:3].tolist() + folder.labels[-3:].tolist()},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)
    data = load_images("someone/shades", "train")
    assert data.label_names == ["dark", "light"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    reordered = load_images("someone/shades", "test", label_names=["light", "dark"])  # the training set's order
    assert reordered.labels.tolist() == [1, 1, 1, 0, 0, 0]
    with pytest.raises(FedCustomError, match="differ from the training set's"):
        load_images("someone/shades", "test", label_names=["grey", "dark"])
