"""Domain-generalization data: the data-set registry, loading domains, and DomainBed's per-domain splits.

Every data set is a list of domains that share one label space. A domain is a map-style torch ``Dataset`` whose items
are ``(image uint8 [3, S, S], label int)``. Folders follow DomainBed's layout ``<root>/<domain>/<class>/<image>`` and
are listed with extensions in any case, through symbolic links, and every image file is checked once when the
domains are built (``folder_domains``): an unreadable file is an error listing them all before any training, or is
left out and recorded with ``--skip_bad_images``. A Hub data set is read through ``datasets.load_dataset(<id>)`` and
split into domains by one of its columns. Every image reaches the model as RGB, whatever its mode (``to_rgb``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from .embedded_digits import CLASSES as DIGIT_CLASSES
from .embedded_digits import build_embedded_digits
from .images import SKIP_OPTION, BadImage, BadImagesError, image_problem, read_image, scan_images, to_rgb  # noqa: F401

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # matched in any case


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


def rgb_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """``img`` (any mode, see ``to_rgb``) resized bilinearly to ``size`` x ``size``, as uint8 ``[3, size, size]``."""
    img = to_rgb(img).resize((size, size), resample=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class HFImageDomain(Dataset):
    """A domain backed by a ``datasets.Dataset``: decodes, converts to RGB and resizes each image when read."""

    def __init__(self, hf_dataset, image_column: str, labels: np.ndarray, image_size: int):
        self.ds, self.image_column, self.size = hf_dataset, image_column, image_size
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return rgb_tensor(self.ds[int(i)][self.image_column], self.size), int(self.labels[i])


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
class ImageFolderDomain(Dataset):
    """A domain read from image files: decodes, converts to RGB and resizes each image when read.

    ``files`` are relative to ``root``; ``skipped`` lists the unreadable files left out (``--skip_bad_images``).
    """

    def __init__(self, root: str, files: list[str], labels: np.ndarray, image_size: int, skipped=()):
        self.root, self.files, self.size = root, list(files), image_size
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.skipped: list[BadImage] = list(skipped)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        path = os.path.join(self.root, self.files[i])
        try:
            img = read_image(path)
        except Exception as err:
            raise OSError(
                f"cannot read {path} ({type(err).__name__}: {err}); it was readable when the data set was built, "
                "so it changed since: restore it, or rerun (the check then reports it)."
            ) from err
        return rgb_tensor(img, self.size), int(self.labels[i])


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _image_names(folder: str) -> list[str]:
    """The image files of ``folder`` (extension in any case; symbolic links followed; hidden files ignored)."""
    return sorted(
        e.name for e in os.scandir(folder) if _is_image(e.name) and not e.name.startswith(".") and not e.is_dir()
    )


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
        stray = _image_names(path)
        if stray:
            raise ValueError(
                f"{path!r} holds images directly ({stray[:3]} …); put each image in a class folder ({layout})."
            )
        names = _subdirs(path)
        if not names:
            raise ValueError(f"domain folder {path!r} has no class folders ({layout}).")
        empty = [c for c in names if not _image_names(os.path.join(path, c))]
        if empty:
            raise ValueError(f"class folder(s) {empty} of {path!r} hold no image ({IMAGE_EXTENSIONS}).")
        classes[domain] = names
    return classes


def list_images(root: str, domain: str, classes: list[str]) -> list[str]:
    """The image files of ``<root>/<domain>/<class>/`` for each class, relative to ``root``, in a fixed order.

    The order is by extension, then path: the order in which the earlier ``datasets`` imagefolder loading read a
    folder, so a folder gets the same splits as before.
    """
    files = [os.path.join(domain, c, name) for c in classes for name in _image_names(os.path.join(root, domain, c))]
    return sorted(files, key=lambda f: (os.path.splitext(f)[1], f))


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
    root: str,
    domains: list[str],
    image_size: int,
    num_classes: int | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> tuple[list[Dataset], list[str]]:
    """Reads each ``<root>/<domain>``; labels come from the class folders.

    Every image file is checked once, now (``scan_images``): unreadable files raise :class:`BadImagesError`
    listing them all, or with ``skip_bad_images`` are left out and listed in each domain's ``skipped``.
    """
    per_domain = check_folder(root, domains)
    classes = _union_classes(per_domain, num_classes)
    files = {d: list_images(root, d, per_domain[d]) for d in domains}
    everything = [f for d in domains for f in files[d]]
    bad = scan_images(root, everything, progress)
    if bad and not skip_bad_images:
        raise BadImagesError(root, bad, len(everything))
    if bad:
        warnings.warn(
            f"{SKIP_OPTION}: leaving out {len(bad)} of the {len(everything)} image files of {root!r}: "
            + "; ".join(f"{b.path} ({b.reason})" for b in bad),
            stacklevel=3,
        )
    skipped = {b.path for b in bad}
    class_index = {c: i for i, c in enumerate(classes)}
    out = []
    for domain in domains:
        good = [f for f in files[domain] if f not in skipped]
        if not good:
            raise ValueError(f"domain folder {os.path.join(root, domain)!r} has no readable image.")
        labels = np.array([class_index[f.split(os.sep)[1]] for f in good], dtype=np.int64)
        lost = [b for b in bad if b.path.split(os.sep)[0] == domain]
        out.append(ImageFolderDomain(root, good, labels, image_size, skipped=lost))
    return out, classes


def skipped_images(domains: list[Dataset]) -> list[BadImage] | None:
    """The unreadable files left out of folder domains (``--skip_bad_images``), in folder order; ``None`` when no
    domain is read from a folder."""
    folders = [d for d in domains if isinstance(d, ImageFolderDomain)]
    return [b for d in folders for b in d.skipped] if folders else None


def image_list_digest(domains: list[Dataset]) -> str | None:
    """A short fingerprint of the images (and labels) folder domains read, or ``None`` for other domains.

    A resumed sweep compares it with the one it started with: the splits are indices into these lists.
    """
    folders = [d for d in domains if isinstance(d, ImageFolderDomain)]
    if not folders:
        return None
    text = "\n".join(f"{f}\t{int(y)}" for d in folders for f, y in zip(d.files, d.labels))
    count = sum(len(d) for d in folders)
    return f"{count} images, sha1 {hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


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
    skip_bad_images: bool = False,
    progress: bool = True,
    **hub_kw,
) -> tuple[list[Dataset], list[str], list[str], DatasetInfo]:
    """The domains of ``dataset``: built in (``EmbeddedDigits``), from ``data_dir``, or from ``hub_dataset``.

    A name outside the registry is allowed with ``data_dir`` (domains = its sorted subfolders) or ``hub_dataset``.
    The image files of ``data_dir`` are checked once, with a progress bar if ``progress``: unreadable ones raise
    :class:`BadImagesError`, or with ``skip_bad_images`` are left out (``skipped_images(domains)`` lists them).
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
        data, classes = folder_domains(
            data_dir, list(info.domains), image_size, info.num_classes or None, skip_bad_images, progress
        )
        return data, classes, list(info.domains), info
    data, classes, names = hub_domains(
        hub_dataset, list(info.domains) if info else None, image_size, **hub_kw, cache_dir=cache_dir
    )
    return data, classes, names, info or DatasetInfo(tuple(names), len(classes))
