"""DG recipe data: DomainBed registry, seeded splits, folder and Hub-style loading, clear folder errors, data folders
as users download them (every image mode, any extension case, symbolic links, stray and unreadable files)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.dg import data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _write_images(folder, n, seed=0, size=(12, 10)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(f"{folder}/{i}.png")


def test_registry_uses_domainbed_domain_names():
    assert data.DATASETS["PACS"].domains == ("art_painting", "cartoon", "photo", "sketch")
    assert data.DATASETS["VLCS"].domains == ("Caltech101", "LabelMe", "SUN09", "VOC2007")
    assert data.DATASETS["OfficeHome"].domains == ("Art", "Clipart", "Product", "Real World")
    assert data.DATASETS["TerraIncognita"].domains == ("location_100", "location_38", "location_43", "location_46")
    assert data.DATASETS["DomainNet"].domains == ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    names = ("PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet")
    assert [data.DATASETS[n].num_classes for n in names] == [7, 5, 65, 10, 345]


def test_split_is_deterministic_disjoint_and_seed_dependent():
    a_in, a_out = data.split_indices(101, 0.2, data.seed_hash(0, 1))
    b_in, b_out = data.split_indices(101, 0.2, data.seed_hash(0, 1))
    c_in, c_out = data.split_indices(101, 0.2, data.seed_hash(1, 1))
    assert np.array_equal(a_in, b_in)
    assert np.array_equal(a_out, b_out)
    assert len(a_out) == 20
    assert len(a_in) == 81
    assert sorted(np.concatenate([a_in, a_out]).tolist()) == list(range(101))
    assert not np.array_equal(a_out, c_out)


# md5 of the tuple's str, mod 2**31 (DomainBed's misc.seed_hash), computed once and pinned
PINNED_SEED_HASHES = {(0, 1): 1514274641, (1, 0): 785910682, ("batch", 3, 0, 0): 816114138}


def test_seed_hash_is_a_pinned_md5_value():
    """Fixed literals: the splits, batches and augmentation of a trial are the same on every machine."""
    for args, value in PINNED_SEED_HASHES.items():
        assert data.seed_hash(*args) == value, args
    assert data.seed_hash(0, 1) != data.seed_hash(1, 0)


@pytest.mark.slow
def test_seed_hash_ignores_pythons_salted_string_hash():
    """Python salts ``hash(str)`` per process (PYTHONHASHSEED); seed_hash of a tuple with a string must not move."""
    code = "from recipes.dg.data import seed_hash; print(seed_hash('batch', 3, 0, 0), hash('batch'))"
    printed = {}
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=REPO)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        printed[hash_seed] = [int(v) for v in out.stdout.split()]
    assert printed["1"][1] != printed["2"][1]  # the salt did change Python's hash("batch")
    assert printed["1"][0] == PINNED_SEED_HASHES[("batch", 3, 0, 0)]
    assert printed["2"][0] == PINNED_SEED_HASHES[("batch", 3, 0, 0)]


def test_make_split_uses_domainbeds_seed_per_trial_and_domain():
    domains = [data.TensorDomain(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.zeros(n)) for n in (10, 21)]
    split = data.make_split(domains, trial=1, holdout_fraction=0.2)
    for i, n in enumerate((10, 21)):
        want_in, want_out = data.split_indices(n, 0.2, data.seed_hash(1, i))
        assert split.train[i].indices == want_in.tolist()
        assert split.held_out[i].indices == want_out.tolist()


def test_folder_loading(tmp_path):
    root = tmp_path / "data"
    for d, dom in enumerate(["b_dom", "a_dom"]):
        _write_images(root / dom / "cat", 3, seed=d)
        _write_images(root / dom / "train", 2, seed=10 + d)  # DomainNet has a class named "train"
    (root / "a_dom" / "cat" / "notes.txt").write_text("not an image")
    domains, classes, names, info = data.load_domains("Mine", str(root), None, 16, cache_dir=str(tmp_path / "c"))
    assert names == ["a_dom", "b_dom"]  # sorted subfolders, like DomainBed
    assert classes == ["cat", "train"]
    assert [len(d) for d in domains] == [5, 5]
    image, label = domains[0][0]
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, 16, 16)
    assert sorted(int(domains[0][i][1]) for i in range(5)) == [0, 0, 0, 1, 1]


def test_folder_with_a_class_missing_in_one_domain_keeps_one_label_space(tmp_path):
    root = tmp_path / "data"
    _write_images(root / "x" / "dog", 2)
    _write_images(root / "x" / "cat", 2)
    _write_images(root / "y" / "dog", 3)
    with pytest.warns(UserWarning, match="1 of the 2 classes"):
        domains, classes, _, _ = data.load_domains("Mine", str(root), None, 8, cache_dir=str(tmp_path / "c"))
    assert classes == ["cat", "dog"]
    assert [int(domains[1][i][1]) for i in range(3)] == [1, 1, 1]


@pytest.mark.parametrize(
    "layout, error, match",
    [
        ("no_root", FileNotFoundError, "is not a folder"),
        ("missing_domain", FileNotFoundError, r"lacks the domain folder\(s\) \['sketch'\]"),
        ("flat_images", ValueError, "holds images directly"),
        ("no_classes", ValueError, "has no class folders"),
        ("empty_class", ValueError, r"class folder\(s\) \['dog'\].*hold no image"),
    ],
)
def test_malformed_pacs_folder_is_a_clear_error(tmp_path, layout, error, match):
    root = tmp_path / "PACS"
    if layout != "no_root":
        for dom in ("art_painting", "cartoon", "photo", "sketch"):
            if layout == "missing_domain" and dom == "sketch":
                continue
            _write_images(root / dom / "dog", 1)
        if layout == "flat_images":
            _write_images(root / "photo", 1)
        if layout == "no_classes":
            for f in (root / "cartoon" / "dog").iterdir():
                f.unlink()
            (root / "cartoon" / "dog").rmdir()
        if layout == "empty_class":
            for f in (root / "sketch" / "dog").iterdir():
                f.unlink()
    with pytest.raises(error, match=match):
        data.load_domains("PACS", str(root), None, 8, cache_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------------------------------------------
# data folders as users download them
# ----------------------------------------------------------------------------------------------------------------
def _image(seed: int, size=(14, 11)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


MODES = {  # file name -> how it is written (every mode a downloaded folder holds)
    "rgb.jpg": lambda im, f: im.save(f),
    "grey.jpg": lambda im, f: im.convert("L").save(f),
    "cmyk.jpg": lambda im, f: im.convert("CMYK").save(f),
    "rgba.png": lambda im, f: im.convert("RGBA").save(f),
    "grey_alpha.png": lambda im, f: im.convert("LA").save(f),
    "palette.png": lambda im, f: im.convert("P").save(f),
    "palette.gif": lambda im, f: im.convert("P").save(f),
    "bilevel.png": lambda im, f: im.convert("1").save(f),
    "grey16.png": lambda im, f: Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257).save(f),
    "upper.JPG": lambda im, f: im.save(f, format="JPEG"),
    "upper.PNG": lambda im, f: im.save(f, format="PNG"),
    "mixed.Jpeg": lambda im, f: im.save(f, format="JPEG"),
}
STRAY = ("notes.txt", ".DS_Store", "Thumbs.db", "._rgb.jpg")  # ._* : macOS resource forks, not images


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A folder as downloaded: every image mode, extensions in any case, stray files, a symlinked domain folder and
    a symlinked class folder. Returns ``(root, domains, classes, names)``."""
    base = tmp_path_factory.mktemp("messy")
    root, elsewhere = base / "data", base / "elsewhere"
    for k, (name, write) in enumerate(MODES.items()):
        os.makedirs(root / "a_dom" / "cat", exist_ok=True)
        write(_image(k), str(root / "a_dom" / "cat" / name))
    for stray in STRAY:
        (root / "a_dom" / "cat" / stray).write_bytes(b"\x00\x05\x16\x07 not an image")
    _write_images(elsewhere / "b_dom" / "cat", 2, seed=1)
    _write_images(elsewhere / "b_dom" / "dog", 3, seed=2)
    _write_images(elsewhere / "dogs", 2, seed=3)
    os.symlink(elsewhere / "b_dom", root / "b_dom")  # a symlinked domain folder
    os.symlink(elsewhere / "dogs", root / "a_dom" / "dog")  # and a symlinked class folder
    domains, classes, names, _ = data.load_domains("Mine", str(root), None, 8, progress=False)
    return root, domains, classes, names


def test_image_extensions_are_matched_in_any_case(messy):
    _, domains, _, _ = messy
    assert {"a_dom/cat/upper.JPG", "a_dom/cat/upper.PNG", "a_dom/cat/mixed.Jpeg"} <= set(domains[0].files)


def test_symlinked_domain_and_class_folders_are_followed(messy):
    _, domains, classes, names = messy
    assert names == ["a_dom", "b_dom"]
    assert classes == ["cat", "dog"]
    assert len(domains[1]) == 5  # b_dom, a link to a folder elsewhere
    assert sum(f.startswith("a_dom/dog/") for f in domains[0].files) == 2  # a_dom/dog, a link to a folder elsewhere


def test_stray_and_hidden_files_are_ignored(messy):
    _, domains, _, _ = messy
    assert len(domains[0]) == len(MODES) + 2  # cat's images and dog's: no .txt, .DS_Store, .db, ._*
    assert data.skipped_images(domains) == []


def test_every_image_mode_reaches_the_model_as_rgb(messy):
    _, domains, _, _ = messy
    for domain in domains:
        for i in range(len(domain)):
            image, _ = domain[i]
            assert image.dtype == torch.uint8, domain.files[i]
            assert tuple(image.shape) == (3, 8, 8), domain.files[i]


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped_to_white(messy):
    root, domains, _, _ = messy
    assert Image.open(root / "a_dom" / "cat" / "grey16.png").mode == "I;16"
    got = domains[0][domains[0].files.index("a_dom/cat/grey16.png")][0]
    eight_bit = _image(list(MODES).index("grey16.png")).convert("L")  # the picture it was written from (x 257)
    assert torch.equal(got, data.rgb_tensor(eight_bit, 8))


def test_the_order_of_a_folder_is_fixed_and_unchanged(messy):
    """By extension, then path: the order the earlier imagefolder loading read (so splits do not move)."""
    _, domains, _, _ = messy
    again, _, _, _ = data.load_domains("Mine", str(messy[0]), None, 8, progress=False)
    assert again[0].files == domains[0].files
    assert domains[1].files == [
        "b_dom/cat/0.png",
        "b_dom/cat/1.png",
        "b_dom/dog/0.png",
        "b_dom/dog/1.png",
        "b_dom/dog/2.png",
    ]
    assert domains[0].files[:3] == ["a_dom/cat/upper.JPG", "a_dom/cat/mixed.Jpeg", "a_dom/cat/upper.PNG"]


def _cut(path, fraction=0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])


@pytest.fixture
def broken(tmp_path):
    """Two domains of good images plus a zero-byte JPEG and a JPEG cut in half (and a copy without them)."""
    root = tmp_path / "data"
    for d, dom in enumerate(["a_dom", "b_dom"]):
        for c, cls in enumerate(["cat", "dog"]):
            os.makedirs(root / dom / cls)
            for i in range(3):
                _image(10 * d + 3 * c + i, size=(40, 32)).save(root / dom / cls / f"{i}.jpg")
    shutil.copytree(root, tmp_path / "clean")
    (root / "a_dom" / "dog" / "1.jpg").write_bytes(b"")
    _cut(root / "b_dom" / "cat" / "2.jpg")
    return root


def test_unreadable_images_stop_the_build_naming_every_file_and_the_fix(broken):
    with pytest.raises(ValueError, match="2 of the 12 image files") as err:
        data.load_domains("Mine", str(broken), None, 8, progress=False)
    message = str(err.value)
    assert f"{broken / 'a_dom' / 'dog' / '1.jpg'}: zero bytes" in message
    assert f"{broken / 'b_dom' / 'cat' / '2.jpg'}: truncated" in message
    assert "--skip_bad_images" in message
    assert "Repair or remove them" in message


def test_skip_bad_images_leaves_them_out_and_names_them(broken):
    with pytest.warns(UserWarning, match="leaving out 2 of the 12"):
        domains, _, _, _ = data.load_domains("Mine", str(broken), None, 8, skip_bad_images=True, progress=False)
    assert [len(d) for d in domains] == [5, 5]
    assert [b.path for b in data.skipped_images(domains)] == ["a_dom/dog/1.jpg", "b_dom/cat/2.jpg"]
    assert [b.reason.split(" ")[0] for b in data.skipped_images(domains)] == ["zero", "truncated"]
    for domain in domains:  # every image left is read
        assert all(tuple(domain[i][0].shape) == (3, 8, 8) for i in range(len(domain)))


def test_skipped_files_do_not_shift_the_other_images(broken, tmp_path):
    """A run and its resume check the folder again and get the same lists; removing the bad files changes nothing."""
    with pytest.warns(UserWarning):
        first, _, _, _ = data.load_domains("Mine", str(broken), None, 8, skip_bad_images=True, progress=False)
    with pytest.warns(UserWarning):
        again, _, _, _ = data.load_domains("Mine", str(broken), None, 8, skip_bad_images=True, progress=False)
    clean, _, _, _ = data.load_domains("Mine", str(tmp_path / "clean"), None, 8, progress=False)
    assert [d.files for d in again] == [d.files for d in first]
    assert [d.labels.tolist() for d in again] == [d.labels.tolist() for d in first]
    assert data.image_list_digest(again) == data.image_list_digest(first)
    without = [[f for f in d.files if f not in ("a_dom/dog/1.jpg", "b_dom/cat/2.jpg")] for d in clean]
    assert [d.files for d in first] == without


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("good", None),
        ("zero_bytes", "zero bytes"),
        ("truncated_jpeg", "truncated"),
        ("truncated_png", "truncated"),
        ("not_an_image", "cannot identify image file"),
        ("broken_link", "broken symbolic link"),
    ],
)
def test_image_problem_names_the_reason(tmp_path, kind, reason):
    path = tmp_path / ("x.png" if kind == "truncated_png" else "x.jpg")
    _image(0, size=(40, 32)).save(path)
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind.startswith("truncated"):
        _cut(path)
    elif kind == "not_an_image":
        path.write_text("<html>404 Not Found</html>")
    elif kind == "broken_link":
        path.unlink()
        os.symlink(tmp_path / "gone.jpg", path)
    problem = data.image_problem(str(path))
    assert problem == reason if reason is None else problem.startswith(reason)


def test_a_file_that_breaks_after_the_check_is_named(broken, tmp_path):
    domains, _, _, _ = data.load_domains("Mine", str(tmp_path / "clean"), None, 8, progress=False)
    (tmp_path / "clean" / domains[0].files[0]).write_bytes(b"")
    with pytest.raises(OSError, match=str(tmp_path / "clean" / domains[0].files[0])):
        domains[0][0]


def test_dataset_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of --data_dir"):
        data.load_domains("PACS", None, None, 8)


def test_hub_style_dataset_is_split_by_its_domain_column(tmp_path):
    """The --hub_dataset path, fed a local folder (load_dataset treats a path like a Hub id)."""
    import datasets

    rng = np.random.default_rng(0)
    rows = {"image": [], "domain": [], "label": []}
    for dom in ("photo", "sketch", "art_painting", "cartoon"):
        for k in range(3):
            rows["image"].append(Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)))
            rows["domain"].append(dom)
            rows["label"].append(["dog", "horse"][k % 2])
    ds = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {"image": datasets.Image(), "domain": datasets.Value("string"), "label": datasets.Value("string")}
        ),
    )
    os.makedirs(tmp_path / "hub")
    ds.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    domains, classes, names, _ = data.load_domains(
        "PACS", None, str(tmp_path / "hub"), 8, cache_dir=str(tmp_path / "c")
    )
    assert names == ["art_painting", "cartoon", "photo", "sketch"]  # registry order, not file order
    assert classes == ["dog", "horse"]
    assert [len(d) for d in domains] == [3, 3, 3, 3]
    assert [domains[2][k][1] for k in range(3)] == [0, 1, 0]
    with pytest.raises(ValueError, match="no column 'dom'"):
        data.load_domains("PACS", None, str(tmp_path / "hub"), 8, cache_dir=str(tmp_path / "c"), domain_column="dom")
