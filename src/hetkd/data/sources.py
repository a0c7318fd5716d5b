"""Labelled datasets as in-memory arrays, behind one registry.

Every source returns an :class:`ArrayDataset`: raw inputs (kept in their
compact stored dtype, e.g. uint8 pixels) plus an affine map to the float
tensors models see, integer labels, and the input shape. Views of a dataset are
index arrays (:class:`DataView`), never copies.

Offline sources that always work: ``digits`` (scikit-learn's 8x8 digits, shipped
with the package) and ``mnist1d`` (generated locally by the ``mnist1d``
package). Online sources (``mnist``, ``fashion_mnist``, ``cifar10``,
``cifar100``, ``svhn``) download through torchvision into ``root``; when that is
impossible, :class:`DatasetUnavailableError` says where to put the files.
``npz`` reads a user's arrays ``x`` and ``y``, and, when the file carries a
federated partition of its own, ``client`` (which client holds each sample)
and ``split`` (0 = that client's train part, 1 = its test part); the partition
method ``given`` then uses that partition as it is.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hetkd.settings import require, require_choice, require_types

__all__ = [
    "DatasetConfig",
    "ArrayDataset",
    "DataView",
    "DatasetUnavailableError",
    "DataError",
    "checked_labels",
    "DATASETS",
    "load_dataset",
]


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are missing and could not be downloaded."""


class DataError(DatasetUnavailableError, ValueError):
    """A user's data cannot be used as it is: the message names the file and the bad rows."""


def _rows(mask: np.ndarray, limit: int = 5) -> str:
    """``"rows 3, 17 and 2 more"`` for the True entries of ``mask``."""
    found = np.flatnonzero(mask)
    shown = ", ".join(str(int(i)) for i in found[:limit])
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return f"row{'s' if len(found) > 1 else ''} {shown}{more}"


def checked_labels(y: np.ndarray, num_classes: int, source: str) -> tuple[np.ndarray, int]:
    """Integer labels ``y`` in ``[0, num_classes)`` and the class count, or :class:`DataError`.

    ``num_classes`` 0 takes it from the data (the largest label + 1), which then
    must use every class below it: a stray label (``100`` among digits) would
    otherwise make a 101-class task of ten real classes.
    """
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be 1-D, got shape {y.shape}")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (np.round(y) != y)
        if bad.any():
            raise DataError(f"{source}: labels must be whole numbers; {_rows(bad)} hold {y[bad][:5].tolist()}")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and (y < 0).any():
        raise DataError(f"{source}: labels must be >= 0; {_rows(y < 0)} hold {sorted(set(y[y < 0].tolist()))[:5]}")
    if num_classes:
        if len(y) and (y >= num_classes).any():
            raise DataError(f"{source}: labels must be below dataset.num_classes={num_classes}; "
                            f"{_rows(y >= num_classes)} hold {sorted(set(y[y >= num_classes].tolist()))[:5]}")
        return y, num_classes
    inferred = int(y.max()) + 1 if len(y) else 0
    unused = sorted(set(range(inferred)) - set(np.unique(y).tolist()))
    if unused:
        top = int(y.max())
        raise DataError(
            f"{source}: labels run to {top} but classes {_span(unused)} never occur, so the class count is "
            f"unclear ({_rows(y == top)} hold {top}); fix the labels or set dataset.num_classes"
        )
    return y, inferred


def _span(values: list[int]) -> str:
    return f"{values[0]}..{values[-1]}" if len(values) > 3 else ", ".join(map(str, values))


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled dataset held in memory.

    ``raw`` keeps the stored dtype; :meth:`inputs` returns float32 model inputs
    ``raw * scale + shift`` for the requested indices, so a uint8 image dataset
    costs one byte per pixel no matter how many views of it exist.
    """

    name: str
    raw: np.ndarray
    labels: np.ndarray
    num_classes: int
    scale: float = 1.0
    shift: float = 0.0
    clients: np.ndarray | None = None
    splits: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.raw) != len(self.labels):
            raise ValueError(
                f"dataset '{self.name}': {len(self.raw)} inputs but {len(self.labels)} labels"
            )
        if self.labels.ndim != 1:
            raise ValueError(f"dataset '{self.name}': labels must be 1-D, got shape {self.labels.shape}")
        for field, values in (("client", self.clients), ("split", self.splits)):
            if values is not None and values.shape != self.labels.shape:
                raise ValueError(
                    f"dataset '{self.name}': array '{field}' has shape {values.shape}, "
                    f"but there are {len(self.labels)} samples"
                )
        if self.splits is not None and self.clients is None:
            raise ValueError(f"dataset '{self.name}': a 'split' array needs a 'client' array beside it")
        if self.clients is not None and len(self.clients) and self.clients.min() < 0:
            raise ValueError(f"dataset '{self.name}': array 'client' holds negative ids ({self.clients.min()})")
        if self.splits is not None and not np.isin(self.splits, (0, 1)).all():
            bad = sorted(set(np.unique(self.splits).tolist()) - {0, 1})
            raise ValueError(f"dataset '{self.name}': array 'split' must hold 0 (train) or 1 (test), found {bad}")

    @property
    def partitioned(self) -> bool:
        """Whether the data carries its own federated partition (a ``client`` array)."""
        return self.clients is not None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, channels first (e.g. ``(1, 8, 8)``, ``(1, 40)``)."""
        return tuple(self.raw.shape[1:])

    def inputs(self, indices: np.ndarray | slice | None = None) -> torch.Tensor:
        """Float32 model inputs for ``indices`` (all when ``None``)."""
        raw = self.raw if indices is None else self.raw[indices]
        x = torch.from_numpy(np.ascontiguousarray(raw)).to(torch.float32)
        if self.scale != 1.0 or self.shift != 0.0:
            x = x * self.scale + self.shift
        return x

    def targets(self, indices: np.ndarray | slice | None = None) -> torch.Tensor:
        """Int64 labels for ``indices`` (all when ``None``)."""
        y = self.labels if indices is None else self.labels[indices]
        return torch.from_numpy(np.ascontiguousarray(y)).to(torch.int64)

    def view(self, indices: np.ndarray) -> DataView:
        """An index view of this dataset."""
        return DataView(self, np.asarray(indices, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class DataView:
    """A subset of an :class:`ArrayDataset`, stored as indices only."""

    base: ArrayDataset
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.base.input_shape

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels[self.indices]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All inputs and labels of the view as tensors."""
        return self.base.inputs(self.indices), self.base.targets(self.indices)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(inputs, labels)`` batches; shuffled with ``generator`` if asked."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = self.indices
        if shuffle:
            perm = torch.randperm(len(order), generator=generator).numpy()
            order = order[perm]
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if drop_last and len(chunk) < batch_size:
                break
            yield self.base.inputs(chunk), self.base.targets(chunk)

    def poisson_batches(
        self, batch_size: int, steps: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` batches of Poisson sampling: each example joins each batch independently with
        probability ``batch_size / len(self)`` (batches vary in size and may be empty), the
        sampling that DP-SGD's privacy analysis assumes (:mod:`hetkd.privacy`)."""
        if batch_size < 1 or steps < 0:
            raise ValueError(f"need batch_size >= 1 and steps >= 0, got {batch_size} and {steps}")
        if len(self.indices) == 0:
            raise ValueError("Poisson sampling needs at least one example")
        rate = min(1.0, batch_size / len(self.indices))
        for _ in range(steps):
            chunk = self.indices[(torch.rand(len(self.indices), generator=generator) < rate).numpy()]
            yield self.base.inputs(chunk), self.base.targets(chunk)


# --------------------------------------------------------------------------- sources


def _digits(**_: object) -> ArrayDataset:
    """scikit-learn's 8x8 digits: the arrays of :func:`sklearn.datasets.load_digits`."""
    table = _shipped_digits_table()
    if table is None:  # a scikit-learn that keeps the file elsewhere: its own loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data, bunch.target
    else:
        pixels, labels = table[:, :-1], table[:, -1]
    images = pixels.astype(np.uint8).reshape(-1, 1, 8, 8)  # values 0..16
    return ArrayDataset("digits", images, labels.astype(np.int64), 10, 2.0 / 16.0, -1.0)


def _shipped_digits_table() -> np.ndarray | None:
    """The digits file scikit-learn ships (64 pixels and the label per row), read without
    importing ``sklearn.datasets``, which costs a device process about 1.4 s even after
    PyTorch has imported scipy (paid again by every deployed ClientApp process). ``None``
    when the file is not where scikit-learn 1.x keeps it."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DatasetUnavailableError("dataset 'digits' needs scikit-learn: pip install scikit-learn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        return None
    table = np.loadtxt(path, delimiter=",")
    return table if table.ndim == 2 and table.shape[1] == 65 else None


def _mnist1d(num_samples: int, **_: object) -> ArrayDataset:
    try:
        import mnist1d.data as m1d
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise DatasetUnavailableError("dataset 'mnist1d' needs the 'mnist1d' package: pip install mnist1d") from err
    args = m1d.get_dataset_args()
    args.num_samples = num_samples if num_samples > 0 else 5000
    state = np.random.get_state()  # mnist1d seeds NumPy's global RNG; leave it as it was
    try:
        data = m1d.make_dataset(args)
    finally:
        np.random.set_state(state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:, None, :]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return ArrayDataset("mnist1d", x, y, 10)


_TORCHVISION = {
    "mnist": ("MNIST", 10),
    "fashion_mnist": ("FashionMNIST", 10),
    "cifar10": ("CIFAR10", 10),
    "cifar100": ("CIFAR100", 100),
    "svhn": ("SVHN", 10),
}


def _torchvision(name: str, root: str, download: bool, **_: object) -> ArrayDataset:
    import torchvision.datasets as tvd

    cls_name, num_classes = _TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    root_path = Path(root).expanduser()
    parts = []
    try:
        for split in ("train", "test"):
            kwargs = {"split": split} if name == "svhn" else {"train": split == "train"}
            parts.append(cls(str(root_path), download=download, **kwargs))
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError
        how = (
            f"set dataset.download=true with network access, or place torchvision's "
            f"'{cls_name}' files under {root_path} (dataset.root)"
        )
        raise DatasetUnavailableError(
            f"dataset '{name}' is not available under {root_path} and could not be "
            f"downloaded ({type(err).__name__}: {err}); {how}. Offline, use "
            f"dataset.name=digits or dataset.name=mnist1d, or dataset.name=npz with your own arrays."
        ) from err
    xs, ys = [], []
    for ds in parts:
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        labels = getattr(ds, "targets", None)
        labels = ds.labels if labels is None else labels
        if data.ndim == 3:  # N x H x W -> N x 1 x H x W
            data = data[:, None]
        elif data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):  # N x H x W x C
            data = data.transpose(0, 3, 1, 2)
        xs.append(data.astype(np.uint8))
        ys.append(np.asarray(labels, dtype=np.int64))
    return ArrayDataset(name, np.concatenate(xs), np.concatenate(ys), num_classes, 2.0 / 255.0, -1.0)


_MNIST_HINT = (
    "MNIST with HtFLlib's partition ships beside the hetkd repository as "
    "../shared/data/mnist_htfllib.npz; otherwise use dataset.name=mnist (torchvision "
    "downloads it into dataset.root, which needs network access) or write your own arrays "
    "with numpy.savez(path, x=..., y=..., client=..., split=...)"
)


def _npz(path: str, num_classes: int, **_: object) -> ArrayDataset:
    """A user's arrays: ``x``, ``y`` and, optionally, ``client`` and ``split``, checked before use.

    Refused with the file and the bad rows named: an unreadable file, labels that
    are not whole numbers in ``[0, num_classes)`` (see :func:`checked_labels`),
    non-finite inputs, client ids that are not integers.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetUnavailableError(
            f"dataset 'npz': file '{file}' (dataset.path) does not exist; {_MNIST_HINT}"
        )
    source = f"dataset 'npz': '{file}'"
    try:
        with np.load(file, allow_pickle=False) as arrays:
            missing = [k for k in ("x", "y") if k not in arrays]
            if missing:
                raise DataError(f"{source} lacks array(s) {missing}; it holds {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
            clients = arrays["client"] if "client" in arrays else None
            splits = arrays["split"] if "split" in arrays else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{source} cannot be read as an .npz of plain arrays (numpy.savez): {err}") from None
    y, num_classes = checked_labels(y, num_classes, source)
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(1)
        if bad.any():
            raise DataError(f"{source}: inputs must be finite; {_rows(bad)} hold NaN or infinite values")
    elif x.dtype.kind not in "iub":
        raise DataError(f"{source}: inputs must be numbers, got dtype {x.dtype}")
    if clients is not None and clients.dtype.kind not in "iu":
        raise DataError(f"{source}: array 'client' must hold integer ids, got dtype {clients.dtype}")
    if x.ndim == 2:  # flat vectors -> one channel
        x = x[:, None, :]
    elif x.ndim == 3:  # N x H x W images -> one channel
        x = x[:, None]
    scale, shift = (2.0 / 255.0, -1.0) if x.dtype == np.uint8 else (1.0, 0.0)
    try:
        return ArrayDataset("npz", x, y, num_classes, scale, shift,
                            None if clients is None else clients.astype(np.int64),
                            None if splits is None else splits.astype(np.int8))
    except ValueError as err:
        raise DataError(f"{source}: {err}") from None


#: name -> loader(**dataset options) -> ArrayDataset
DATASETS: dict[str, Callable[..., ArrayDataset]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    **{name: functools.partial(_torchvision, name) for name in _TORCHVISION},
    "npz": _npz,
}


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """Where the labelled data comes from.

    ``name`` is a key of :data:`DATASETS`. ``root`` is where downloadable
    datasets live (``download`` fetches them there when missing). ``path`` is
    the ``.npz`` file for ``name=npz`` (relative paths are taken from the
    working directory where the run starts). ``test_fraction`` of the pool is
    held out as the global test set, which no device trains on; with
    ``partition.method=given`` it is that fraction of the clients' pooled
    test parts (see :func:`hetkd.data.given_partition`). ``num_samples``
    bounds how many samples are generated or used (0 = all). ``num_classes``
    is the class count the labels must fit (0: the data's own, which for an
    ``.npz`` is its largest label + 1 and must then use every class below it);
    a user's labels outside ``[0, num_classes)``, non-finite inputs or an
    unreadable file stop the run before any device starts, naming the file
    and the rows.
    """

    name: str = "digits"
    root: str = "~/.cache/hetkd/data"
    download: bool = True
    path: str = ""
    test_fraction: float = 0.2
    num_samples: int = 0
    num_classes: int = 0

    def __post_init__(self) -> None:
        require_types(self)
        require_choice(self.name, "name", sorted(DATASETS))
        require(0.0 < self.test_fraction < 1.0, "test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        require(self.num_samples >= 0, "num_samples", f"must be >= 0 (0 = all), got {self.num_samples}")
        require(self.num_classes == 0 or self.num_classes >= 2, "num_classes",
                f"must be 0 (from the data) or >= 2, got {self.num_classes}")
        require(self.name != "npz" or bool(self.path), "path", "must name a .npz file when dataset.name=npz")


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, root: str, download: bool, path: str, num_samples: int, num_classes: int) -> ArrayDataset:
    ds = DATASETS[name](root=root, download=download, path=path, num_samples=num_samples, num_classes=num_classes)
    if num_classes and ds.num_classes != num_classes:
        raise DataError(f"dataset.num_classes={num_classes}, but dataset '{name}' has {ds.num_classes} classes")
    if 0 < num_samples < len(ds):
        keep = np.sort(np.random.default_rng(0).permutation(len(ds))[:num_samples])
        ds = ArrayDataset(
            ds.name, ds.raw[keep], ds.labels[keep], ds.num_classes, ds.scale, ds.shift,
            None if ds.clients is None else ds.clients[keep],
            None if ds.splits is None else ds.splits[keep],
        )
    return ds


def load_dataset(
    name: str,
    *,
    root: str = DatasetConfig.root,
    download: bool = DatasetConfig.download,
    path: str = DatasetConfig.path,
    num_samples: int = DatasetConfig.num_samples,
    num_classes: int = DatasetConfig.num_classes,
) -> ArrayDataset:
    """Load (once per process) the dataset registered as ``name``.

    ``num_samples`` > 0 keeps a seeded random subset of that size (for
    ``mnist1d`` it is the number generated).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(sorted(DATASETS))}")
    return _load_cached(name, root, download, path, num_samples, num_classes)
