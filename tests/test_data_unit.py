"""Data pipeline pieces without Ray: decode robustness, augment, masking, tokenizers, config."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes
from PIL import Image

from beit_ray.config import ConfigError
from beit_ray.data.augment import ClassifyTransform, PretrainTransform, normalize, sample_crop
from beit_ray.data.config import DataConfig
from beit_ray.data.decode import DecodeError, decode_image
from beit_ray.data.masking import BlockMaskGenerator, random_mask
from beit_ray.data.tokenizers.codebook import Codebook, kmeans, patch_features
from beit_ray.data.tokenizers.dalle import DalleEncoder, convert, load_encoder


def _png(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _enc(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------- decode


def test_decode_formats_and_modes(photos):
    rgb = Image.fromarray(photos["chelsea"])
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        out = decode_image(_enc(rgb, fmt))
        assert out.shape == (300, 451, 3) and out.dtype == np.uint8, fmt
    # CMYK JPEG, palette, 1-bit, LA
    assert decode_image(_enc(rgb.convert("CMYK"), "JPEG")).shape == (300, 451, 3)
    assert decode_image(_png(rgb.convert("P"))).shape == (300, 451, 3)
    assert decode_image(_png(rgb.convert("1"))).shape == (300, 451, 3)
    assert decode_image(_png(rgb.convert("LA"))).shape == (300, 451, 3)


def test_decode_alpha_on_white_and_16bit_scaled():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    out = decode_image(_png(Image.fromarray(rgba)))
    assert (out[:2, :, 0] == 200).all() and (out[:2, :, 1] == 0).all()
    assert (out[2:] == 255).all()  # transparent → white
    a16 = np.array([[0, 257 * 100], [65535, 32768]], np.uint16)
    out = decode_image(_png(Image.fromarray(a16)))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 100 and out[1, 0, 0] == 255 and out[1, 1, 0] == 128


def test_decode_exif_orientation(photos):
    img = Image.fromarray(photos["chelsea"])  # 451 wide, 300 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    data = _enc(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data).shape == (451, 300, 3)
    # draft never breaks orientation either
    assert (
        decode_image(data, target_size=100).shape[:2][0]
        > decode_image(data, target_size=100).shape[1]
    )


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "empty"),
        ("text", "not_an_image"),
        ("corrupt", ("corrupt", "truncated", "not_an_image")),
        ("truncated", "truncated"),
        ("bomb", "too_large"),
    ],
)
def test_decode_bad_inputs(photos, kind, reason):
    good = jpeg_bytes(photos["astronaut"])
    data = {
        "empty": b"",
        "text": b"hello, I am not an image" * 10,
        "corrupt": good[:200] + bytes(range(256)) * 40 + good[-100:],
        "truncated": good[: len(good) // 2],
        "bomb": _png(Image.new("1", (20000, 20000))),
    }[kind]
    with pytest.raises(DecodeError) as e:
        decode_image(data, max_pixels=50_000_000)
    assert e.value.reason in ((reason,) if isinstance(reason, str) else reason)
    # What failed, never the repr of the in-memory file Pillow read (the page and API show it)
    assert " object at 0x" not in str(e.value) and "BytesIO" not in str(e.value)


def test_not_an_image_says_what_was_read():
    with pytest.raises(DecodeError) as e:
        decode_image(b"hello, I am not an image")
    assert str(e.value) == (
        "not_an_image: UnidentifiedImageError: cannot identify image file "
        "(24 bytes: 68 65 6c 6c 6f 2c 20 49 ...)"
    )


def test_draft_decodes_smaller_but_enough(photos):
    data = jpeg_bytes(photos["astronaut"])  # 512x512
    assert decode_image(data).shape == (512, 512, 3)
    small = decode_image(data, target_size=100)
    assert small.shape == (128, 128, 3)


# --------------------------------------------------------------------------- augment


def test_sample_crop_matches_torchvision_rules():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        i, j, h, w = sample_crop(rng, 500, 375)
        assert i >= 0 and i + h <= 375 and j >= 0 and j + w <= 500
        areas.append(h * w / (500 * 375))
    assert min(areas) > 0.07 and max(areas) <= 1.0
    # Impossible crops fall back to the centre crop clamped to the ratio range.
    assert sample_crop(np.random.default_rng(0), 1000, 10, scale=(0.99, 1.0)) == (0, 493, 10, 13)


def test_pretrain_transform_deterministic_per_key_and_epoch(photos):
    tf = PretrainTransform(
        image_size=64, tokenizer_size=32, grid=4, num_masking_patches=6, min_num_patches=2
    )
    data = jpeg_bytes(photos["coffee"])
    a, b = tf(data, "k1", 0), tf(data, "k1", 0)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert a[0].shape == (3, 64, 64) and a[1].shape == (3, 32, 32) and a[2].shape == (16,)
    assert a[0].dtype == np.uint8 and a[2].dtype == bool
    c = tf(data, "k1", 1)
    assert not (a[0] == c[0]).all()  # a fresh crop in the next epoch
    assert not (a[0] == tf(data, "k2", 0)[0]).all()


def test_classify_transforms_and_normalize(photos):
    data = jpeg_bytes(photos["rocket"])
    ev = ClassifyTransform(image_size=48, train=False)
    assert (ev(data, "a") == ev(data, "b")).all()  # eval is not random
    tr = ClassifyTransform(image_size=48, train=True)(data, "a")
    assert tr.shape == (3, 48, 48)
    x = normalize(np.full((3, 2, 2), 255, np.uint8), "beit")
    assert np.allclose(x, 1.0)
    t = normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "imagenet")
    assert torch.allclose(t[0, 0], torch.full((2, 2), -0.485 / 0.229))


# --------------------------------------------------------------------------- masking


def test_block_mask_statistics_and_contiguity():
    gen = BlockMaskGenerator(14, 75, 16)
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng) for _ in range(500)])
    counts = masks.reshape(500, -1).sum(1)
    assert counts.max() <= 75
    assert 70 <= counts.mean() <= 75  # BEiT's generator lands close to the budget

    def neighbours(
        m: np.ndarray,
    ) -> float:  # fraction of masked patches with a masked right/down neighbour
        pairs = (m[:, 1:] & m[:, :-1]).sum() + (m[1:] & m[:-1]).sum()
        return pairs / max(1, m.sum())

    block = np.mean([neighbours(m) for m in masks[:100]])
    rand = np.mean([neighbours(random_mask(rng, 14, 75)) for _ in range(100)])
    assert block > 1.5 and rand < 0.9  # blocks are contiguous, random masks are not


def test_mask_scaling_in_config():
    cfg = DataConfig(image_size=32, patch_size=8, tokenizer_image_size=32, tokenizer="none")
    assert cfg.grid == 4 and cfg.masking_patches == 6 and cfg.min_patches == 1
    d = DataConfig()
    assert d.grid == 14 and d.masking_patches == 75 and d.min_patches == 16
    with pytest.raises(ConfigError, match="data.tokenizer_image_size"):
        # DALL-E needs 32; checked by the jobs that make masked-patch rows
        DataConfig(image_size=32, patch_size=8, tokenizer_image_size=16).check_masked_patches()


# --------------------------------------------------------------------------- tokenizers


def _openai_shaped_pickle(enc: DalleEncoder, path: str) -> None:
    """Pickle an encoder the way OpenAI's encoder.pkl is: objects of dall_e.* classes."""
    mods = {name: types.ModuleType(name) for name in ("dall_e", "dall_e.encoder", "dall_e.utils")}
    classes = {}
    for mod, name in (
        ("dall_e.encoder", "Encoder"),
        ("dall_e.encoder", "EncoderBlock"),
        ("dall_e.utils", "Conv2d"),
    ):
        cls = type(name, (torch.nn.Module,), {"__module__": mod, "forward": lambda self, x: x})
        setattr(mods[mod], name, cls)
        classes[name] = cls

    def swap(m: torch.nn.Module) -> None:
        for child in m.children():
            swap(child)
        kind = type(m).__name__
        if kind in ("DalleEncoder", "EncoderBlock", "Conv2d"):
            m.__class__ = classes["Encoder" if kind == "DalleEncoder" else kind]

    sys.modules.update(mods)
    try:
        swap(enc)
        torch.save(enc, path)
    finally:
        for name in mods:
            sys.modules.pop(name, None)


def test_dalle_converter_round_trip(tmp_path):
    torch.manual_seed(0)
    ref = DalleEncoder(n_hid=64, vocab_size=512).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = ref.tokenize(pixels)
    assert expected.shape == (2, 16)
    victim = DalleEncoder(n_hid=64, vocab_size=512)
    victim.load_state_dict(ref.state_dict())
    _openai_shaped_pickle(victim, str(tmp_path / "encoder.pkl"))
    assert "dall_e" not in sys.modules
    from beit_ray.data.tokenizers.dalle import main

    with pytest.raises(SystemExit):  # no flag, no pickle
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "encoder.pkl"),
                "--output",
                str(tmp_path / "x.safetensors"),
            ]
        )
    main(
        [
            "convert",
            "--input",
            str(tmp_path / "encoder.pkl"),
            "--output",
            str(tmp_path / "enc.safetensors"),
            "--i-trust-this-pickle",
        ]
    )
    loaded = load_encoder(str(tmp_path / "enc.safetensors"))
    assert torch.equal(loaded.tokenize(pixels), expected)
    assert set(loaded.state_dict()) == set(ref.state_dict())
    assert "blocks.group_2.block_1.id_path.w" in loaded.state_dict()


class Foreign:
    """A class the converter must refuse to instantiate from a pickle."""


def test_converter_refuses_foreign_classes(tmp_path):
    import pickle

    path = tmp_path / "evil.pkl"
    torch.save({"x": Foreign()}, path)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        convert(str(path), str(tmp_path / "out.safetensors"))


def test_default_dalle_shape():
    enc = DalleEncoder()
    assert enc.state_dict()["blocks.output.conv.w"].shape == (8192, 2048, 1, 1)
    assert enc.state_dict()["blocks.input.w"].shape == (256, 3, 7, 7)


def test_codebook_fit_and_tokenize(tmp_path, photos):
    tf = PretrainTransform(
        image_size=32, tokenizer_size=32, grid=4, num_masking_patches=6, min_num_patches=1
    )
    views = np.stack(
        [tf(jpeg_bytes(p), f"{n}{i}", 0)[1] for i in range(8) for n, p in photos.items()]
    )
    feats = patch_features(views, 4)  # [B, 16, 3*64+3]
    assert feats.shape == (len(views), 16, 195)
    cent = kmeans(feats.reshape(-1, 195), 32, 10, torch.Generator().manual_seed(0))
    book = Codebook(cent, 4)
    book.save(str(tmp_path / "cb.safetensors"))
    again = Codebook.load(str(tmp_path / "cb.safetensors"))
    ids = again.tokenize(views)
    assert ids.shape == (len(views), 16) and int(ids.max()) < 32
    assert len(torch.unique(ids)) > 16  # codes are actually used
    # k-means beats a random codebook on its own data
    rand = Codebook(feats.reshape(-1, 195)[torch.randperm(feats.shape[0] * 16)[:32]], 4)

    def err(b: Codebook) -> float:
        f = feats.reshape(-1, 195)
        return float(((f - b.centroids[b.assign(f)]) ** 2).sum(-1).mean())

    assert err(again) < err(rand)


# --------------------------------------------------------------------------- speed paths


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("key", ["k0", "k1", "k2", "k3"])
def test_pretrain_views_follow_the_unilm_recipe(photos, key):
    """Flip, then crop, then bicubic / Lanczos from that crop, exactly as unilm (no draft)."""
    from beit_ray.data.augment import image_rng

    data = jpeg_bytes(photos["chelsea"])
    kw = dict(image_size=128, tokenizer_size=64, grid=8, num_masking_patches=24, min_num_patches=4)
    crop_tf = PretrainTransform(**kw, draft=False, color_jitter=0.0, tokenizer_view="crop")
    fast_tf = PretrainTransform(**kw, draft=False, color_jitter=0.0)  # tokenizer view from patch
    rng = image_rng(0, 0, key)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    i, j, h, w = sample_crop(rng, *img.size)
    crop = img.crop((j, i, j + w, i + h))
    patch = np.asarray(crop.resize((128, 128), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    tok = np.asarray(crop.resize((64, 64), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    p, t, m = crop_tf(data, key)
    # Resizing with a box (filter taps may reach just outside the crop, and the mirrored box
    # is resized then flipped) vs crop-then-resize: identical up to the crop's border pixels.
    assert _mad(p, patch) < 0.1 and _mad(t, tok) < 0.3
    assert m.shape == (64,) and 0 < m.sum() <= 24
    p2, t2, m2 = fast_tf(data, key)
    assert (p2 == p).all() and (m2 == m).all()  # same crop and mask
    assert _mad(t2, tok) < 1.0  # tokenizer view from the patch view: within one level


def test_pretrain_batch_preallocated_matches_transform(photos):
    from beit_ray.data.pipeline import pretrain_batch

    cfg = DataConfig(
        source="unused", tokenizer="none", image_size=32, patch_size=8, tokenizer_image_size=16
    )
    tf = PretrainTransform.from_config(cfg)
    images = [jpeg_bytes(photos["coffee"]), b"not an image", jpeg_bytes(photos["rocket"]), b""]
    n = len(images)
    batch = {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "path": np.array([f"p{i}" for i in range(n)], dtype=object),
        "image": np.array(images, dtype=object),
        "error": np.array(["", "", "", "read_failed: gone"], dtype=object),
        "epoch": np.full(n, 3, np.int64),
        "shard": np.arange(n, dtype=np.int64),
    }
    out = pretrain_batch(batch, cfg, None, None)
    assert list(out["key"]) == ["k0", "k2"] and list(out["shard"]) == [0, 2]
    for row, k in enumerate((0, 2)):
        p, t, m = tf(images[k], f"k{k}", 3)
        assert (out["pixel_values"][row] == p).all() and (out["tokenizer_pixels"][row] == t).all()
        assert (out["bool_masked_pos"][row] == m).all()
    assert out["pixel_values"].shape == (2, 3, 32, 32) and out["pixel_values"].dtype == np.uint8


def test_tokenizer_view_config_checked():
    with pytest.raises(ConfigError, match="data.tokenizer_view"):
        DataConfig(source="x", tokenizer="none", tokenizer_view="bogus")  # type: ignore[arg-type]
