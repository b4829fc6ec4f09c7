"""Dataset registry: shapes determinism and balance, imagefolder layout, clear offline errors."""

from __future__ import annotations

import sys
import typing

import numpy as np
import pytest
from PIL import Image

from vs2ray.config import DATASETS_WITH_GROUPS, TYPOGRAPHIC_DATASETS, DatasetConfig
from vs2ray.data import DATASETS, DatasetUnavailable, get_dataset
from vs2ray.data.shapes import (
    CLASS_BLOCKS,
    COLOURS,
    SPURIOUS_ATTRIBUTES,
    ShapesDataset,
    SpuriousShapesDataset,
    render_shape,
    shape_mask,
    write_word,
)


def pixels_of(dataset, split, ids):
    records = dataset.records(split)
    return np.stack([np.asarray(dataset.load_image(split, records[i].ref)) for i in ids])


def test_config_names_exactly_the_registered_datasets():
    allowed = typing.get_args(DatasetConfig.model_fields["name"].annotation)
    assert (
        set(allowed)
        == set(DATASETS)
        == {
            "shapes",
            "shapes_spurious",
            "shapes_typographic",
            "cifar100",
            "imagefolder",
            "huggingface",
            "waterbirds",
            "celeba",
            "rta100",
            "paint_typographic",
        }
    )


def test_shapes_meets_the_bundled_world_spec():
    dataset = get_dataset(DatasetConfig(name="shapes"))
    assert len(dataset.classes) >= 20 and len(set(dataset.classes)) == len(dataset.classes)
    assert all(name.replace(" ", "").isalpha() for name in dataset.classes)  # plain words
    assert dataset.num_images("train") >= 20_000 and dataset.num_images("test") >= 5_000
    image = dataset.load_image("test", "0")
    assert image.size == (32, 32) and image.mode == "RGB"
    # each block pairs near colours with near shapes: 4 classes that differ in one attribute each
    for colours, shapes in CLASS_BLOCKS:
        assert {f"{c} {s}" for c in colours for s in shapes} <= set(dataset.classes)


def test_shapes_same_seed_same_images_and_ids():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    ids = [0, 1, 17, 4999]
    assert a.records("test") == b.records("test")
    assert [r.id for r in a.records("test")] == list(range(5000))
    np.testing.assert_array_equal(pixels_of(a, "test", ids), pixels_of(b, "test", ids))


def test_shapes_differs_across_seeds_and_splits():
    base = pixels_of(ShapesDataset(seed=0), "test", range(20))
    assert not np.array_equal(base, pixels_of(ShapesDataset(seed=1), "test", range(20)))
    assert not np.array_equal(base, pixels_of(ShapesDataset(seed=0), "train", range(20)))


def test_shapes_records_labels_match_rendered_images_and_cover_all_classes():
    dataset = ShapesDataset(seed=0, split_sizes={"test": 3000})
    records = dataset.records("test")
    assert len(records) == 3000
    assert all(render_shape(0, "test", r.id).label == r.label for r in records[:300])
    counts = np.bincount([r.label for r in records], minlength=len(dataset.classes))
    assert counts.min() > 0.5 * counts.mean()  # roughly balanced, no class missing


def test_shape_masks_tell_near_shapes_apart():
    yy, xx = np.mgrid[-16:16:0.25, -16:16:0.25]
    masks = {s: shape_mask(s, xx, yy, radius=10, angle=0.0) for s in ("circle", "hexagon", "ring")}
    square = shape_mask("square", xx, yy, radius=10, angle=np.pi / 4)
    diamond = shape_mask("diamond", xx, yy, radius=10, angle=0.0)
    area = {k: v.mean() for k, v in masks.items()}
    # hexagon is inscribed in the circle; ring has a hole of radius 0.55 r
    assert area["hexagon"] == pytest.approx(area["circle"] * 3 * np.sqrt(3) / (2 * np.pi), rel=0.02)
    assert area["ring"] == pytest.approx(area["circle"] * (1 - 0.55**2), rel=0.03)
    assert square.mean() == pytest.approx(diamond.mean(), rel=0.01) and (square != diamond).mean() > 0.05


def test_imagefolder_ids_labels_and_readable_names(tmp_path):
    for split, per_class in (("train", 3), ("val", 2)):
        for folder in ("002.Laysan_Albatross", "001.Black_footed_Albatross"):
            (tmp_path / split / folder).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / split / folder / f"img{i}.png")
    (tmp_path / "train" / "001.Black_footed_Albatross" / "notes.txt").write_text("not an image")
    dataset = get_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))
    assert dataset.classes == ["Black footed Albatross", "Laysan Albatross"]
    assert dataset.splits == ("train", "val")
    records = dataset.records("val")
    assert [r.id for r in records] == [0, 1, 2, 3] and [r.label for r in records] == [0, 0, 1, 1]
    assert records[3].ref.endswith("002.Laysan_Albatross/img1.png")
    assert dataset.load_image("val", records[1].ref).getpixel((0, 0)) == (40, 0, 0)
    with pytest.raises(ValueError, match="has no split 'test'; available"):
        dataset.records("test")


def test_imagefolder_tiny_imagenet_words_and_class_name_override(tmp_path):
    for wnid in ("n01443537", "n01629819"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
    (tmp_path / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n")
    assert get_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path))).classes == [
        "goldfish",
        "European fire salamander",
    ]
    named = get_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), class_names=["a", "b"]))
    assert named.classes == ["a", "b"]
    with pytest.raises(ValueError, match="has 1 names but"):
        get_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), class_names=["a"]))


def test_missing_local_copies_fail_with_instructions(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"no train/ directory"):
        get_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))
    cifar = get_dataset(DatasetConfig(name="cifar100", root=str(tmp_path)))
    with pytest.raises(DatasetUnavailable) as caught:
        cifar.records("train")
    message = str(caught.value)
    assert "dataset.root" in message and "dataset.download" in message and "cifar-100-python" in message


def test_cifar100_download_offline_fails_clearly(tmp_path):
    cifar = get_dataset(DatasetConfig(name="cifar100", root=str(tmp_path), download=True))
    with pytest.raises(DatasetUnavailable, match=r"dataset\.root"):
        cifar.records("test")


def test_huggingface_without_datasets_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    dataset = get_dataset(DatasetConfig(name="huggingface", hf_path="uoft-cs/cifar100"))
    with pytest.raises(DatasetUnavailable, match=r"vs2ray\[hf\]"):
        dataset.records("train")


def test_spurious_world_colour_agrees_with_shape_in_train_only_and_the_pixels_show_it():
    dataset = SpuriousShapesDataset(seed=0, split_sizes={"train": 4000, "test": 2000})
    train, test = dataset.records("train"), dataset.records("test")
    agreement = {name: np.mean([r.label == r.attribute for r in rs]) for name, rs in (("train", train), ("test", test))}
    assert 0.94 < agreement["train"] < 0.96 and 0.47 < agreement["test"] < 0.53
    assert {dataset.group_of(r.label, r.attribute) for r in test} == {0, 1, 2, 3}
    assert dataset.classes == ["circle", "square"] and dataset.attribute_names == ("warm", "cool")
    # the object is painted in a colour of its attribute's family, its shape is its class (the caption names both)
    for record in test[:60]:
        colour, shape = next(
            (c, s) for c in COLOURS for s in dataset.classes if f" {c} {s}" in " " + dataset.caption("test", record.id)
        )
        assert (
            colour in SPURIOUS_ATTRIBUTES[dataset.attribute_names[record.attribute]]
            and shape == dataset.classes[record.label]
        )
    again = SpuriousShapesDataset(seed=0, split_sizes={"train": 4000, "test": 2000})
    assert np.array_equal(pixels_of(dataset, "test", [5, 9]), pixels_of(again, "test", [5, 9]))
    assert not np.array_equal(pixels_of(dataset, "test", [5]), pixels_of(SpuriousShapesDataset(seed=1), "test", [5]))


def test_typographic_world_writes_nothing_the_own_or_another_class_name_as_its_attribute_says():
    dataset = get_dataset(DatasetConfig(name="shapes_typographic", sizes={"test": 900}))
    plain = ShapesDataset(seed=0)
    records = dataset.records("test")
    assert dataset.classes == plain.classes and dataset.attribute_names == (*plain.classes, "no word")
    assert [r.label for r in records] == [r.label for r in plain.records("test")[:900]]  # shapes' images, labels
    no_word = len(dataset.classes)
    conditions = np.array([0 if r.attribute == no_word else 1 if r.attribute == r.label else 2 for r in records])
    assert np.allclose(np.bincount(conditions, minlength=3) / len(records), 1 / 3, atol=0.05)
    for record in records[:40]:
        pixels = np.asarray(dataset.load_image("test", record.ref))
        shapes_pixels = np.asarray(plain.load_image("test", record.ref))
        assert pixels.shape == (64, 64, 3)
        word = None if record.attribute == no_word else dataset.classes[record.attribute]
        # the pixels are the shapes image doubled with the attribute's word written in one of the corners
        assert any(np.array_equal(pixels, write_word(shapes_pixels, word, c)) for c in range(4)), record
    assert np.array_equal(
        np.asarray(dataset.load_image("test", "7")),
        np.asarray(get_dataset(DatasetConfig(name="shapes_typographic", sizes={"test": 900})).load_image("test", "7")),
    )
    assert "shapes_typographic" in TYPOGRAPHIC_DATASETS and "shapes_typographic" in DATASETS_WITH_GROUPS


def _image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_waterbirds_and_celeba_read_their_metadata_with_groups(tmp_path):
    birds = tmp_path / "waterbirds"
    rows = [("a/1.jpg", 0, 0, 0), ("b/2.jpg", 1, 0, 1), ("a/3.jpg", 1, 2, 0), ("b/4.jpg", 0, 1, 1)]
    for name, *_ in rows:
        _image(birds / name, (10, 200, 10))
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    lines += [f"{i},{name},{y},{split},{place},x.jpg" for i, (name, y, split, place) in enumerate(rows)]
    (birds / "metadata.csv").write_text("\n".join(lines) + "\n")
    waterbirds = get_dataset(DatasetConfig(name="waterbirds", root=str(birds)))
    train = waterbirds.records("train")
    assert [(r.label, r.attribute) for r in train] == [(0, 0), (1, 1)] and [r.id for r in train] == [0, 1]
    assert [(r.label, r.attribute) for r in waterbirds.records("test")] == [(1, 0)]
    assert waterbirds.group_of(1, 1) == 3 and waterbirds.load_image("val", waterbirds.records("val")[0].ref).size == (
        8,
        8,
    )

    celeb = tmp_path / "celeba"
    _image(celeb / "img_align_celeba" / "img_align_celeba" / "000001.jpg", (250, 220, 120))
    _image(celeb / "img_align_celeba" / "img_align_celeba" / "000002.jpg", (40, 30, 20))
    (celeb / "list_attr_celeba.csv").write_text(
        "image_id,Blond_Hair,Male,Smiling\n000001.jpg,1,-1,1\n000002.jpg,-1,1,-1\n"
    )
    (celeb / "list_eval_partition.csv").write_text("image_id,partition\n000001.jpg,0\n000002.jpg,2\n")
    celeba = get_dataset(DatasetConfig(name="celeba", root=str(celeb)))
    assert celeba.classes == ["no blond hair", "blond hair"] and celeba.attribute_names == ("not male", "male")
    assert [(r.label, r.attribute) for r in celeba.records("train")] == [(1, 0)]
    assert [(r.label, r.attribute) for r in celeba.records("test")] == [(0, 1)]
    pixel = np.asarray(celeba.load_image("train", celeba.records("train")[0].ref))[0, 0].astype(int)
    assert np.abs(pixel - [250, 220, 120]).max() <= 3  # the blond image, through JPEG
    smiling = get_dataset(DatasetConfig(name="celeba", root=str(celeb), target_attribute="Smiling"))
    assert [r.label for r in smiling.records("test")] == [0]
    with pytest.raises(ValueError, match="has no attribute"):
        get_dataset(DatasetConfig(name="celeba", root=str(celeb), group_attribute="Wearing_Hat"))


def test_waterbirds_and_celeba_without_their_files_say_what_to_download(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"metadata\.csv is missing.*group_DRO"):
        get_dataset(DatasetConfig(name="waterbirds", root=str(tmp_path)))
    with pytest.raises(DatasetUnavailable, match=r"list_attr_celeba\.csv is missing.*dataset\.root"):
        get_dataset(DatasetConfig(name="celeba", root=str(tmp_path)))


@pytest.mark.parametrize(
    ("name", "folder"),
    [("rta100", "ours/data"), ("paint_typographic", "typographic_real_data_from_PAINT/typographic_attacks")],
)
def test_typographic_sets_read_object_and_written_word_from_their_file_names(tmp_path, name, folder):
    images = tmp_path / folder
    written = {  # file name -> (object, word), in the published layout; objects may hold spaces and underscores
        "label=dog_text=cat.png": ("dog", "cat"),
        "label=cat_text=dog.jpg": ("cat", "dog"),
        "label=tennis ball_text=apple.png": ("tennis ball", "apple"),
        "label=ice_cream_text=lemon.JPEG": ("ice_cream", "lemon"),
        **{f"label=dog_text=ice_cream{i}.png": ("dog", f"ice_cream{i}") for i in range(6)},
    }
    for i, file_name in enumerate(written):
        _image(images / file_name, (10 * i, 200, 10))
    (images / "README.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"1 file\(s\) .* skipped.*README\.txt"):
        dataset = get_dataset(DatasetConfig(name=name, root=str(tmp_path), seed=3))
    expected_classes = sorted({word for pair in written.values() for word in pair})
    assert dataset.classes == expected_classes and dataset.prompt_templates == ("a photo of a {}.",)
    records = {split: dataset.records(split) for split in ("train", "val", "test")}
    assert [len(r) for r in records.values()] == [5, 2, 3]  # 50 / 20 / 30 of 10 files
    seen = {}
    for split, split_records in records.items():
        assert [r.id for r in split_records] == list(range(len(split_records)))
        for record in split_records:
            file_name = record.ref.rsplit("/", 1)[-1]
            assert (dataset.classes[record.label], dataset.classes[record.attribute]) == written[file_name]
            assert dataset.load_image(split, record.ref).size == (8, 8)
            seen[file_name] = split
    assert sorted(seen) == sorted(written)  # every image in exactly one split
    with pytest.warns(UserWarning):
        again = get_dataset(DatasetConfig(name=name, root=str(tmp_path), seed=3))
        other = get_dataset(DatasetConfig(name=name, root=str(tmp_path), seed=4))
    assert again.records("test") == records["test"]  # the seed fixes the split
    assert other.records("test") != records["test"]
    assert dataset.group_of(record.label, record.attribute) == record.label * len(expected_classes) + record.attribute


def test_typographic_sets_without_their_files_say_where_they_come_from(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"rta100: .*ours/data is missing.*rta100\.zip.*Defense-Prefix"):
        get_dataset(DatasetConfig(name="rta100", root=str(tmp_path)))
    with pytest.raises(DatasetUnavailable, match=r"typographic_attacks is missing.*mlfoundations/patching"):
        get_dataset(DatasetConfig(name="paint_typographic", root=str(tmp_path)))
    (tmp_path / "ours" / "data").mkdir(parents=True)
    _image(tmp_path / "ours" / "data" / "dog.png", (1, 2, 3))
    with pytest.raises(
        DatasetUnavailable, match=r"no image named label=<object>_text=<word>.* \(1 other file\(s\): dog\.png\)"
    ):
        get_dataset(DatasetConfig(name="rta100", root=str(tmp_path)))
