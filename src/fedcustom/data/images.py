"""Labelled images: the packaged Fashion-MNIST alias (the Debian package ``dataset-fashion-mnist``), an image folder
(``CLASS/xxx.png``), or any Hugging Face image dataset; split over clients like labelled texts.

Rows keep their images (the ``image`` column, PNG-encoded by ``datasets``) and integer ``labels``; pixels are made
per batch by the model's processor (:class:`ImageCollator`), so nothing holds a float copy of a whole dataset.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from fedcustom.data.sources import check_split_flags, is_local
from fedcustom.errors import FedCustomError

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
FEATURES = datasets.Features({"image": datasets.Image(), "labels": datasets.Value("int64")})


@dataclass(frozen=True)
class Images:
    """Images (uint8 arrays or PIL images) with integer labels 0..K-1 named by ``label_names``."""

    images: list[Any]
    labels: np.ndarray
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, rows: list[int]) -> Images:
        return Images([self.images[i] for i in rows], self.labels[rows], self.label_names)

    def table(self) -> datasets.Dataset:
        """The rows as a ``datasets`` table: ``image`` (PNG-encoded) and ``labels``."""
        return datasets.Dataset.from_dict({"image": list(self.images), "labels": self.labels.tolist()},
                                          features=FEATURES)


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


def _fashion_mnist(split: str) -> Images:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise FedCustomError(f"dataset {FASHION_MNIST!r}: split {split!r} does not exist; it has train and test")
    images, labels = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise FedCustomError(f"dataset alias {FASHION_MNIST!r} reads {FASHION_MNIST_DIR}, which the Debian package "
                             f"{FASHION_MNIST_PACKAGE} installs: apt-get install {FASHION_MNIST_PACKAGE}")
    pixels = _idx(images, 16).reshape(-1, 28, 28)
    return Images(list(pixels), _idx(labels, 8).astype(np.int64), list(FASHION_MNIST_LABELS))


def _folder(path: Path, label_names: list[str] | None) -> Images:
    """``path/CLASS/*.png``: one subfolder per class, named by it."""
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise FedCustomError(f"image folder {path}: expected one subfolder per class (e.g. {path}/cat/001.png)")
    names = label_names or classes
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise FedCustomError(f"image folder {path}: classes {', '.join(unknown[:5])} are not among the expected "
                             f"{', '.join(names)}")
    images, labels = [], []
    for name in classes:
        for file in sorted(f for f in (path / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(file) as image:
                images.append(image.copy())
            labels.append(names.index(name))
    if not images:
        raise FedCustomError(f"image folder {path}: no {'/'.join(IMAGE_SUFFIXES)} files in its class folders")
    return Images(images, np.array(labels, dtype=np.int64), list(names))


def _hub(name: str, split: str, label_names: list[str] | None) -> Images:
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as exc:  # hub errors vary (offline, missing split, gated): report the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedCustomError(f"image dataset {name!r}: not the packaged alias {FASHION_MNIST}, not an image folder, "
                             f"and split {split!r} not loadable from the Hub ({first})") from None
    image_column = next((c for c in ("image", "img", "pixel_values") if c in table.column_names), None)
    label_column = next((c for c in ("label", "labels", "fine_label") if c in table.column_names), None)
    if image_column is None or label_column is None:
        raise FedCustomError(f"image dataset {name!r}: expected an image and a label column, got "
                             f"{', '.join(table.column_names)}")
    feature = table.features[label_column]
    raw = table[label_column]
    values = [feature.int2str(v) for v in raw] if hasattr(feature, "names") else [str(v) for v in raw]
    own = list(feature.names) if hasattr(feature, "names") else sorted(set(values))
    names = label_names or own
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise FedCustomError(f"image dataset {name!r}: labels {', '.join(unknown[:5])} differ from the training set's "
                             f"{', '.join(names)}")
    index = {label: i for i, label in enumerate(names)}
    return Images(list(table[image_column]), np.asarray([index[v] for v in values], dtype=np.int64), names)


def load_images(source: str, split: str = "train", label_names: list[str] | None = None) -> Images:
    """Any supported image source as images with integer labels (in ``label_names``' order when given)."""
    if source == FASHION_MNIST:
        data = _fashion_mnist(split)
    elif Path(source).expanduser().is_dir():
        data = _folder(Path(source).expanduser(), label_names)
    elif Path(source).expanduser().exists():
        raise FedCustomError(f"image dataset {source}: expected a folder with one subfolder per class")
    else:
        data = _hub(source, split, label_names)
    if label_names is not None and data.label_names != label_names:
        raise FedCustomError(f"image dataset {source}: its labels {data.label_names} differ from the training "
                             f"set's {label_names}")
    return data


class ImageCollator:
    """A batch of rows (``image``, ``labels``) as the model's ``pixel_values`` and ``labels`` tensors."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = self.processor([row["image"] for row in rows], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor([row["labels"] for row in rows], dtype=torch.long)}


def _subsample(data: Images, limit: int | None, seed: int) -> Images:
    from fedcustom.data import stratified_split

    if limit is None or limit >= len(data):
        return data
    kept, _ = stratified_split(data.labels.tolist(), limit, seed)
    return data.select(kept)


def prepare_image_data(cfg: Any, num_clients: int, seed: int) -> Any:
    """Training images split over the clients and the held-out evaluation images (``--eval-dataset``, else
    ``--eval-split`` of the same source, else a stratified ``--eval-fraction`` of it), deterministic for a seed."""
    from fedcustom.config import parse_partition
    from fedcustom.data import EvalRows, FederatedData, stratified_split
    from fedcustom.data.partition import partition_indices

    check_split_flags(cfg, has_splits=cfg.dataset == FASHION_MNIST or not is_local(cfg.dataset))
    train = load_images(cfg.dataset, cfg.train_split)
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    if cfg.eval_dataset or cfg.eval_split:
        evaluation = load_images(cfg.eval_dataset or cfg.dataset, cfg.eval_split or "test", train.label_names)
    else:
        keep = len(train) - max(1, round(len(train) * cfg.eval_fraction))
        kept, held = stratified_split(train.labels.tolist(), keep, split_seed)
        train, evaluation = train.select(kept), train.select(held)
    train = _subsample(train, cfg.max_train_examples, seed)
    evaluation = _subsample(evaluation, cfg.max_eval_examples, split_seed)
    labels = datasets.Dataset.from_dict({"label": train.labels.tolist()})
    indices = partition_indices(labels, parse_partition(cfg.partition), num_clients, seed)
    return FederatedData(train=train.table(), test=EvalRows(evaluation.table()), client_indices=indices,
                         label_names=train.label_names)
