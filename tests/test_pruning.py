"""Masks and global magnitude pruning: exact counts, order, allowed sets, zeros that stay zero, files."""

import copy

import pytest
import torch
import torch.nn.utils.prune as tprune

from llt.data.augment import Normalizer, make_generator
from llt.errors import LLTError
from llt.models import build_model, conv_weight_names
from llt.pruning import Mask, global_magnitude_prune, prune_count
from llt.trainer import Schedule, TaskData, Trainer


def model(width=4, seed=0):
    return build_model(2, 2, width=width, seed=seed)


def weights(m):
    return dict(m.named_parameters())


def test_prune_count_reproduces_the_papers_top_down_densities():
    total = 11_159_232
    kept, seen = total, []
    for r in range(1, 15):
        kept -= prune_count(0.2, kept)
        if r in (1, 2, 5, 9, 14):
            seen.append(round(100 * kept / total, 2))
    assert seen == [80.00, 64.00, 32.77, 13.42, 4.40]


def test_exact_count_and_magnitude_order():
    m = model()
    mask = Mask.ones(m)
    new = global_magnitude_prune(weights(m), mask, 0.2)
    n = mask.num_total()
    assert new.num_kept() == n - round(0.2 * n)
    w = weights(m)
    kept = torch.cat([w[k].detach().abs().flatten()[new[k].flatten()] for k in new.names()])
    pruned = torch.cat([w[k].detach().abs().flatten()[~new[k].flatten()] for k in new.names()])
    assert kept.min() >= pruned.max()
    # a second round removes 20 % of what remains, never resurrecting anything
    newer = global_magnitude_prune(weights(m), new, 0.2)
    assert newer.num_kept() == new.num_kept() - round(0.2 * new.num_kept()) and newer.issubset(new)


def test_pruning_within_an_allowed_set_never_touches_the_rest():
    m = model()
    full = Mask.ones(m)
    protected = global_magnitude_prune(weights(m), full, 0.6)           # an "old ticket" of 40 %
    allowed = ~protected                                                  # only the other weights may go
    new = global_magnitude_prune(weights(m), full, 0.2, allowed=allowed)
    assert protected.issubset(new)
    assert new.num_kept() == full.num_total() - round(0.2 * allowed.num_kept())
    w = weights(m)
    removed = torch.cat([w[k].detach().abs().flatten()[(~new[k] & allowed[k]).flatten()] for k in new.names()])
    kept_free = torch.cat([w[k].detach().abs().flatten()[(new[k] & allowed[k]).flatten()] for k in new.names()])
    assert kept_free.min() >= removed.max()


def test_fraction_must_be_inside_zero_one():
    m = model()
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(LLTError, match=r"prune fraction must be in \(0, 1\)"):
            global_magnitude_prune(weights(m), Mask.ones(m), bad)


def test_a_layer_losing_all_its_weights_is_named():
    m = model()
    with torch.no_grad():
        m.conv1.weight.mul_(1e-6)     # the stem becomes the smallest layer by far
    with pytest.raises(LLTError, match="pruning would remove every weight of layer conv1.weight"):
        global_magnitude_prune(weights(m), Mask.ones(m), 0.2)
    out = global_magnitude_prune(weights(m), Mask.ones(m), 0.2, allow_empty_layer=True)
    assert not out["conv1.weight"].any()


def test_set_algebra_density_and_subsets():
    m = model()
    a = global_magnitude_prune(weights(m), Mask.ones(m), 0.5)
    b = global_magnitude_prune(weights(m), a, 0.5)
    assert b.issubset(a) and not a.issubset(b)
    assert (a & b) == b and (a | b) == a and (~a & a).num_kept() == 0
    assert (~a).num_kept() == a.num_total() - a.num_kept()
    assert a.density() == pytest.approx(0.5, abs=1e-4)
    layer, count = a.first_outside(b)
    assert layer in a.names() and count > 0
    dens = b.per_layer_density()
    assert set(dens) == set(conv_weight_names(m)) and all(0 <= v <= 1 for v in dens.values())


def tiny_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat_interleave(24)
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=g)
    return TaskData(images, labels, torch.arange(48), torch.arange(0), torch.arange(8))


def test_pruned_weights_stay_exactly_zero_through_training_with_momentum_and_weight_decay():
    m = model()
    before = copy.deepcopy(m)
    mask = global_magnitude_prune(weights(m), Mask.ones(m), 0.7)
    trainer = Trainer(m, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    trainer.fit_task(0, tiny_data(), Schedule(epochs=4, lr=0.1, momentum=0.9, weight_decay=5e-3, batch_size=8),
                     make_generator(0, "cpu"), mask=mask)
    assert mask.pruned_nonzero(m) == {}
    # kept weights, negative ones included, did train
    w0, w1 = weights(before), weights(m)
    for n in mask.names():
        keep = mask[n]
        neg = keep & (w0[n].detach() < 0)
        assert not torch.equal(w1[n].detach()[neg], w0[n].detach()[neg]), n
    assert Mask.from_nonzero(m).issubset(mask)


def test_the_trainer_refuses_a_mask_that_does_not_fit_before_training():
    m = model()
    before = copy.deepcopy(m.state_dict())
    wrong = Mask.ones(model(8))                          # a mask made for width 8
    trainer = Trainer(m, Normalizer((0.5,) * 3, (0.25,) * 3, "cpu"))
    with pytest.raises(LLTError, match=r"the training's mask: conv1.weight has shape \(8, 3, 3, 3\)"):
        trainer.fit_task(0, tiny_data(), Schedule(epochs=1, lr=0.1, batch_size=8), make_generator(0, "cpu"), mask=wrong)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())     # nothing was trained


def test_save_load_round_trip_and_refusals(tmp_path):
    m = model()
    mask = global_magnitude_prune(weights(m), Mask.ones(m), 0.3)
    mask.save(tmp_path / "m.pt", task=1)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["state"]["conv1.weight"].dtype == torch.bool
    assert Mask.load(tmp_path / "m.pt", m) == mask
    Mask.ones(model(8)).save(tmp_path / "w.pt")                         # a mask made for width 8
    with pytest.raises(LLTError, match=r"conv1.weight has shape \(8, 3, 3, 3\) in the mask, the model's weight is \(4, 3, 3, 3\)"):
        Mask.load(tmp_path / "w.pt", m)
    partial = Mask({k: v for k, v in mask.masks.items() if k != "conv1.weight"})
    partial.save(tmp_path / "p.pt")
    with pytest.raises(LLTError, match=r"does not fit the model \(missing \['conv1.weight'\]"):
        Mask.load(tmp_path / "p.pt", m)
    from llt.storage import save_checkpoint

    save_checkpoint(tmp_path / "f.pt", {"conv1.weight": torch.ones(4, 3, 3, 3)})
    with pytest.raises(LLTError, match="not a mask file"):
        Mask.load(tmp_path / "f.pt", m)


def test_export_to_torch_prune_layout():
    m = model()
    mask = global_magnitude_prune(weights(m), Mask.ones(m), 0.5)
    mask.apply_(m)
    state = mask.to_prune_layout(m)
    assert "conv1.weight_orig" in state and "conv1.weight_mask" in state and "conv1.weight" not in state
    other = model(seed=1)
    modules = dict(other.named_modules())
    for n in mask.names():
        tprune.identity(modules[n.rsplit(".", 1)[0]], "weight")
    other.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    m.eval()
    other.eval()
    assert torch.allclose(m(x, 2), other(x, 2), atol=1e-6)
    assert torch.equal(modules["conv1"].weight_mask.bool(), mask["conv1.weight"])
