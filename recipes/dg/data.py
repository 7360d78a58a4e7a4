"""Domain-generalization data: the data-set registry, loading domains, and DomainBed's per-domain splits.

Every data set is a list of domains that share one label space. A domain is a map-style torch ``Dataset`` whose items
are ``(image uint8 [3, S, S], label int)``. Folders follow DomainBed's layout ``<root>/<domain>/<class>/<image>`` and
are read through ``datasets.load_dataset("imagefolder", ...)``; a Hub data set is read through
``datasets.load_dataset(<id>)`` and split into domains by one of its columns.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .embedded_digits import CLASSES as DIGIT_CLASSES
from .embedded_digits import build_embedded_digits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    """What DomainBed declares about a data set: its domains (folder names, in test-env order) and class count."""

    domains: tuple[str, ...]
    num_classes: int
    hflip: bool = True  # horizontal flips are a valid augmentation (natural images yes, digits no)
    steps: int = 5000  # DomainBed's default training length


DATASETS: dict[str, DatasetInfo] = {
    "PACS": DatasetInfo(("art_painting", "cartoon", "photo", "sketch"), 7),
    "VLCS": DatasetInfo(("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5),
    "OfficeHome": DatasetInfo(("Art", "Clipart", "Product", "Real World"), 65),
    "TerraIncognita": DatasetInfo(("location_100", "location_38", "location_43", "location_46"), 10),
    "DomainNet": DatasetInfo(("clipart", "infograph", "painting", "quickdraw", "real", "sketch"), 345, steps=15000),
    # built from packages by embedded_digits.py; no folder needed
    "EmbeddedDigits": DatasetInfo(("mnist", "mnist_m", "printed", "uci"), 10, hflip=False, steps=200),
}
EMBEDDED = "EmbeddedDigits"


def seed_hash(*args) -> int:
    """A stable integer seed from any values (DomainBed's ``misc.seed_hash``)."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """DomainBed's ``split_dataset``: shuffle ``range(n)`` with ``seed``; the first ``holdout_fraction`` is held out.

    Returns ``(in_indices, out_indices)``: training part and held-out (validation or test) part.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}.")
    keys = np.arange(n)
    np.random.RandomState(seed).shuffle(keys)
    cut = int(n * holdout_fraction)
    return keys[cut:], keys[:cut]


@dataclass
class Split:
    """One trial's DomainBed split of every domain."""

    train: list[Subset]  # 1 - holdout_fraction of each domain (training part; test part of a held-out domain)
    held_out: list[Subset]  # holdout_fraction of each domain (validation part of a training domain)


def make_split(domains: list[Dataset], trial: int, holdout_fraction: float) -> Split:
    """Splits domain ``i`` with seed ``seed_hash(trial, i)``, as DomainBed's ``train.py`` does."""
    train, held = [], []
    for i, dom in enumerate(domains):
        in_idx, out_idx = split_indices(len(dom), holdout_fraction, seed_hash(trial, i))
        train.append(Subset(dom, in_idx.tolist()))
        held.append(Subset(dom, out_idx.tolist()))
    return Split(train, held)


# ----------------------------------------------------------------------------------------------------------------
# domains as torch data sets
# ----------------------------------------------------------------------------------------------------------------
class TensorDomain(Dataset):
    """A domain held in memory: ``images`` uint8 ``[N, 3, S, S]``, ``labels`` int64 ``[N]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, S, S], got {images.dtype} {tuple(images.shape)}.")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])

    def __getitems__(self, idx: list[int]):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return list(zip(self.images[idx], self.labels[idx].tolist()))


class HFImageDomain(Dataset):
    """A domain backed by a ``datasets.Dataset``: decodes, converts to RGB and resizes each image when read."""

    def __init__(self, hf_dataset, image_column: str, labels: np.ndarray, image_size: int):
        self.ds, self.image_column, self.size = hf_dataset, image_column, image_size
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def _to_tensor(self, img) -> torch.Tensor:
        img = img.convert("RGB").resize((self.size, self.size), resample=2)  # 2 = PIL bilinear
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __getitem__(self, i: int):
        return self._to_tensor(self.ds[int(i)][self.image_column]), int(self.labels[i])


def embedded_domains(image_size: int) -> tuple[list[Dataset], list[str]]:
    """The embedded digits benchmark (see ``embedded_digits.py``) as in-memory domains."""
    domains = []
    for images, labels in build_embedded_digits(image_size).values():
        chw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        domains.append(TensorDomain(chw, torch.from_numpy(labels)))
    return domains, list(DIGIT_CLASSES)


# ----------------------------------------------------------------------------------------------------------------
# folders: <root>/<domain>/<class>/<image>
# ----------------------------------------------------------------------------------------------------------------
def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def check_folder(root: str, domains: list[str]) -> dict[str, list[str]]:
    """Validates ``<root>/<domain>/<class>/<image>`` and returns ``{domain: [class, ...]}``.

    Raises ``FileNotFoundError``/``ValueError`` naming the missing or malformed part and the layout expected.
    """
    layout = "expected layout: <data_dir>/<domain>/<class>/<image>"
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data_dir {root!r} is not a folder ({layout}).")
    found = _subdirs(root)
    missing = [d for d in domains if d not in found]
    if missing:
        raise FileNotFoundError(
            f"data_dir {root!r} lacks the domain folder(s) {missing}; expected {list(domains)}, found {found} "
            f"({layout}). Domain folder names are DomainBed's."
        )
    classes = {}
    for domain in domains:
        path = os.path.join(root, domain)
        stray = sorted(f for f in os.listdir(path) if _is_image(f))
        if stray:
            raise ValueError(
                f"{path!r} holds images directly ({stray[:3]} …); put each image in a class folder ({layout})."
            )
        names = _subdirs(path)
        if not names:
            raise ValueError(f"domain folder {path!r} has no class folders ({layout}).")
        empty = [c for c in names if not any(_is_image(f) for f in os.listdir(os.path.join(path, c)))]
        if empty:
            raise ValueError(f"class folder(s) {empty} of {path!r} hold no image ({IMAGE_EXTENSIONS}).")
        classes[domain] = names
    return classes


def _union_classes(per_domain: dict[str, list[str]], num_classes: int | None) -> list[str]:
    names = sorted(set().union(*per_domain.values()))
    for domain, cls in per_domain.items():
        if len(cls) != len(names):
            warnings.warn(
                f"domain {domain!r} has {len(cls)} of the {len(names)} classes; the others have no image.",
                stacklevel=3,
            )
    if num_classes is not None and len(names) != num_classes:
        warnings.warn(f"found {len(names)} classes, DomainBed's data set has {num_classes}.", stacklevel=3)
    return names


def folder_domains(
    root: str, domains: list[str], image_size: int, num_classes: int | None = None, cache_dir: str | None = None
) -> tuple[list[Dataset], list[str]]:
    """Loads each ``<root>/<domain>`` with ``datasets``' ``imagefolder`` builder; labels come from class folders."""
    import datasets

    per_domain = check_folder(root, domains)
    classes = _union_classes(per_domain, num_classes)
    out = []
    for domain in domains:
        path = os.path.join(glob_escape(root), glob_escape(domain))
        # data_files, not data_dir: with data_dir a class folder named "train" or "test" (DomainNet has "train")
        # would be read as a split. drop_labels=False keeps labels even for a single class folder.
        files = {"train": [os.path.join(path, "*", f"*{ext}") for ext in _ext_patterns()]}
        ds = datasets.load_dataset(
            "imagefolder", data_files=files, split="train", cache_dir=cache_dir, drop_labels=False
        )
        names = ds.features["label"].names
        remap = np.array([classes.index(n) for n in names], dtype=np.int64)
        out.append(HFImageDomain(ds, "image", remap[np.asarray(ds["label"], dtype=np.int64)], image_size))
    return out, classes


def glob_escape(s: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in s)


def _ext_patterns() -> list[str]:
    return sorted({e for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper())})


# ----------------------------------------------------------------------------------------------------------------
# Hub (or local) data sets loaded with datasets.load_dataset(<id>)
# ----------------------------------------------------------------------------------------------------------------
def hub_domains(
    dataset_id: str,
    domains: list[str] | None,
    image_size: int,
    domain_column: str = "domain",
    label_column: str = "label",
    image_column: str = "image",
    cache_dir: str | None = None,
) -> tuple[list[Dataset], list[str], list[str]]:
    """Loads every split of ``dataset_id``, concatenates them, and splits the rows into domains by ``domain_column``.

    Returns ``(domains, class names, domain names)``. ``domains=None`` takes the column's sorted distinct values.
    """
    import datasets

    loaded = datasets.load_dataset(dataset_id, cache_dir=cache_dir)
    ds = datasets.concatenate_datasets(list(loaded.values())) if isinstance(loaded, datasets.DatasetDict) else loaded
    for col in (domain_column, label_column, image_column):
        if col not in ds.column_names:
            raise ValueError(
                f"{dataset_id!r} has no column {col!r} (columns: {ds.column_names}); "
                "set --hub_domain_column / --hub_label_column / --hub_image_column."
            )

    def names_of(col: str) -> np.ndarray:
        feat, values = ds.features[col], ds[col]
        if isinstance(feat, datasets.ClassLabel):
            return np.array(feat.names, dtype=object)[np.asarray(values)]
        return np.array([str(v) for v in values], dtype=object)

    row_domain, row_label = names_of(domain_column), names_of(label_column)
    present = sorted(set(row_domain))
    domains = list(domains) if domains is not None else present
    missing = [d for d in domains if d not in present]
    if missing:
        raise ValueError(
            f"{dataset_id!r} has no rows for domain(s) {missing} in column {domain_column!r}; found {present}."
        )
    feat = ds.features[label_column]
    classes = list(feat.names) if isinstance(feat, datasets.ClassLabel) else sorted(set(row_label))
    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_index[c] for c in row_label], dtype=np.int64)
    out = []
    for domain in domains:
        rows = np.flatnonzero(row_domain == domain)
        out.append(HFImageDomain(ds.select(rows), image_column, labels[rows], image_size))
    return out, classes, domains


def load_domains(
    dataset: str,
    data_dir: str | None,
    hub_dataset: str | None,
    image_size: int,
    cache_dir: str | None = None,
    **hub_kw,
) -> tuple[list[Dataset], list[str], list[str], DatasetInfo]:
    """The domains of ``dataset``: built in (``EmbeddedDigits``), from ``data_dir``, or from ``hub_dataset``.

    A name outside the registry is allowed with ``data_dir`` (domains = its sorted subfolders) or ``hub_dataset``.
    Returns ``(domains, class names, domain names, info)``.
    """
    info = DATASETS.get(dataset)
    if dataset == EMBEDDED:
        data, classes = embedded_domains(image_size)
        return data, classes, list(info.domains), info
    if (data_dir is None) == (hub_dataset is None):
        raise ValueError(f"--dataset {dataset} needs exactly one of --data_dir (a folder) or --hub_dataset (an id).")
    if data_dir is not None:
        if info is None:
            if not os.path.isdir(data_dir):
                raise FileNotFoundError(f"data_dir {data_dir!r} is not a folder.")
            info = DatasetInfo(tuple(_subdirs(data_dir)), num_classes=0)
            if len(info.domains) < 2:
                raise ValueError(f"{data_dir!r} needs at least two domain folders, found {list(info.domains)}.")
        data, classes = folder_domains(data_dir, list(info.domains), image_size, info.num_classes or None, cache_dir)
        return data, classes, list(info.domains), info
    data, classes, names = hub_domains(
        hub_dataset, list(info.domains) if info else None, image_size, **hub_kw, cache_dir=cache_dir
    )
    return data, classes, names, info or DatasetInfo(tuple(names), len(classes))
