"""PreAct-ResNet-18: layer structure, conv weight count, heads, branches, width and 64x64 variants."""

import torch
import torch.nn as nn

from llt.models import build_model, conv_weight_names, count_conv_weights, forward_flops_per_image, remaining_weights


def test_full_width_has_the_papers_conv_weight_count_and_flops():
    m = build_model(5, 2)
    assert count_conv_weights(m) == 11_159_232
    assert len(conv_weight_names(m)) == 1 + 16 + 3            # stem, 16 block convs, 3 projection shortcuts
    assert sum(p.numel() for n, p in m.named_parameters() if ".bn" in n) == 6_784  # BN affine params
    # 0.555 G multiply-accumulates per 32x32 image (PERFORMANCE.md)
    assert abs(forward_flops_per_image(m) / 2 - 0.555e9) / 0.555e9 < 0.01


def test_layer_names_and_shortcuts_match_the_original():
    m = build_model(5, 2, width=8)
    names = set(dict(m.named_parameters()))
    for n in ("conv1.weight", "layer1.0.bn1.weight", "layer2.0.shortcut.0.weight", "layer4.1.conv2.weight"):
        assert n in names
    assert not hasattr(m.layer1[0], "shortcut") and not hasattr(m.layer2[1], "shortcut")
    assert all(m.bias is None for m in m.modules() if isinstance(m, nn.Conv2d))


def test_projection_shortcut_sees_the_preactivated_input():
    m = build_model(1, 2, width=4).eval()
    block = m.layer2[0]
    x = torch.randn(2, 4, 8, 8)
    pre = torch.relu(block.bn1(x))
    expect = block.conv2(torch.relu(block.bn2(block.conv1(pre)))) + block.shortcut(pre)
    assert torch.allclose(block(x), expect, atol=1e-6)
    ident = m.layer1[1]
    y = torch.randn(2, 4, 8, 8)
    expect = ident.conv2(torch.relu(ident.bn2(ident.conv1(torch.relu(ident.bn1(y)))))) + y
    assert torch.allclose(ident(y), expect, atol=1e-6)


def test_heads_concatenate_per_branch_and_ignore_later_heads():
    m = build_model(5, 2, width=8, seed=0).eval()
    x = torch.randn(3, 3, 32, 32)
    f = m.features(x)
    assert f.shape == (3, 64)
    main3 = m(x, 3, "main")
    assert main3.shape == (3, 6)
    assert torch.allclose(main3[:, 2:4], m.heads_main[1](f), atol=1e-6)
    assert not torch.allclose(main3, m(x, 3, "aux"))
    with torch.no_grad():
        m.heads_main[4].bias.fill_(1e6)   # a future head must not leak into the first three tasks' logits
    assert torch.allclose(m(x, 3, "main"), main3)


def test_width_multiplier_and_64x64_variant():
    small = build_model(10, 20, width=4)
    # 3x3 block and shortcut convs scale with width^2, the stem (3 input channels) with width
    assert count_conv_weights(small) == (11_159_232 - 1728) // 256 + 1728 // 16
    big = build_model(10, 20, width=8, image_size=64)
    assert big.stem_stride == 2
    assert big.features(torch.randn(2, 3, 64, 64)).shape == (2, 64)
    # the 64x64 variant keeps the CIFAR feature-map sizes, hence the same cost as 32x32
    assert forward_flops_per_image(big, 64) == forward_flops_per_image(build_model(10, 20, width=8), 32)
    assert count_conv_weights(big) == count_conv_weights(build_model(10, 20, width=8))


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(2, 2, width=4, seed=7)
    after = torch.rand(1)
    b = build_model(2, 2, width=4, seed=7)
    assert before == after
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_model(2, 2, width=4, seed=8)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_remaining_weights_counts_nonzero_conv_weights_only():
    m = build_model(2, 2, width=4)
    assert remaining_weights(m) == 100.0
    total = count_conv_weights(m)
    with torch.no_grad():
        m.conv1.weight.zero_()                       # 3*4*9 = 108 weights
        m.heads_main[0].weight.zero_()               # heads are not conv weights
    assert abs(remaining_weights(m) - 100.0 * (total - 108) / total) < 1e-9
