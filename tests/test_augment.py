"""Whole-batch crop and flip, normalisation and batch order on the device (CPU here)."""

import torch
import torch.nn.functional as F

from llt.data.augment import Normalizer, crop_flip, make_generator


def batch(n=16, hw=8):
    return torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def candidates(img, pad):
    """Every crop (and flipped crop) of a zero-padded image."""
    p = F.pad(img, (pad, pad, pad, pad))
    h, w = img.shape[1:]
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            c = p[:, dy:dy + h, dx:dx + w]
            out += [c, c.flip(2)]
    return out


def test_every_output_is_a_padded_crop_or_its_mirror():
    x = batch()
    y = crop_flip(x, make_generator(1, "cpu"), pad=4)
    assert y.shape == x.shape and y.dtype == torch.uint8
    for i in range(x.shape[0]):
        assert any(torch.equal(y[i], c) for c in candidates(x[i], 4)), f"image {i} is not a crop"


def test_offsets_and_flips_vary_and_cover_the_range():
    x = torch.full((2000, 3, 8, 8), 255, dtype=torch.uint8)
    y = crop_flip(x, make_generator(2, "cpu"), pad=4)
    # rows/cols of zeros reveal the offset: black rows at the top mean a downward shift, etc.
    black_rows = (y[:, 0].amax(dim=2) == 0).sum(1)
    assert set(black_rows.tolist()) == {0, 1, 2, 3, 4}
    x = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8).expand(2000, 3, 8, 8).contiguous()
    flipped = crop_flip(x, make_generator(3, "cpu"), pad=0)[:, 0, 0, 0] == 7
    assert 0.45 < flipped.float().mean() < 0.55


def test_same_seed_same_augmentation():
    x = batch()
    a = crop_flip(x, make_generator(5, "cpu"))
    b = crop_flip(x, make_generator(5, "cpu"))
    c = crop_flip(x, make_generator(6, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_pad_no_flip_is_identity():
    x = batch()
    assert torch.equal(crop_flip(x, make_generator(0, "cpu"), pad=0, flip=False), x)


def test_normalizer_matches_the_formula_and_layout():
    x = batch(4)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    norm = Normalizer(mean, std, "cpu", channels_last=True)
    y = norm(x)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(y, ref, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert Normalizer(mean, std, "cpu", dtype=torch.bfloat16)(x).dtype == torch.bfloat16
