"""Config: presets, typed overrides, validation."""

import pytest
import yaml

from llt.config import RunConfig, from_tree, load_config, to_tree
from llt.presets import available_presets
from llt.errors import LLTError

REQUIRED = {"demo", "paper-cifar10-cil", "paper-cifar10-td", "paper-cifar10-bu", "paper-cifar100-cil",
            "paper-cifar100-td", "paper-cifar100-bu", "tinyimagenet-bu"}


def test_required_presets_exist():
    assert REQUIRED <= set(available_presets())


@pytest.mark.parametrize("preset", sorted(REQUIRED))
def test_every_preset_resolves_and_round_trips_through_yaml(preset):
    cfg = load_config(preset)
    assert from_tree(yaml.safe_load(yaml.safe_dump(to_tree(cfg)))) == cfg


def test_presets_encode_the_paper_protocols():
    td = load_config("paper-cifar10-td")
    assert td.run.method == "td" and td.prune.td_rounds == (1, 1, 3, 4, 5) and td.data.dataset == "cifar10"
    assert td.train.epochs == 100 and td.train.milestones == (60, 80) and td.data.exemplars_per_class == 100
    c100 = load_config("paper-cifar100-td")
    assert c100.data.num_tasks == 10 and c100.data.classes_per_task == 10 and c100.prune.td_densities[-1] == 0.0966
    bu = load_config("paper-cifar10-bu")
    assert (bu.prune.deacc, bu.prune.accept_decay, bu.prune.base_sparsity, bu.prune.max_rounds) == (2.0, 1.0, 90.0, 26)
    tin = load_config("tinyimagenet-bu")
    assert tin.data.classes_per_task == 20 and tin.run.method == "bu"


def test_overrides_are_typed():
    cfg = load_config("demo", ["train.lr=1", "data.class_order=[9,8,7,6,5,4,3,2,1,0]", "run.seed=0",
                               "train.milestones=5,7", "teaching.enabled=false", "run.name=my run"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.class_order == (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
    assert cfg.train.milestones == (5, 7) and cfg.teaching.enabled is False and cfg.run.name == "my run"


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", r"unknown config key 'train.epochz' \(did you mean train.epochs\?\)"),
    ("trian.epochs=3", "unknown config key 'trian.epochs'"),
    ("epochs=3", "unknown config key 'epochs'"),
    ("train.epochs=ten", "train.epochs: expected an integer, got 'ten'"),
    ("train.epochs=2.5", "train.epochs: expected an integer"),
    ("train.lr=true", "train.lr: expected a number"),
    ("teaching.enabled=1", "teaching.enabled: expected true or false"),
    ("data.dataset=mnist", "data.dataset: 'mnist' is not one of"),
    ("data.classes_per_task=3", "10 classes are not divisible into tasks of 3 classes"),
    ("data.class_order=[0,1,2,3,4,5,6,7,8,0]", "data.class_order is not a permutation of 0..9"),
    ("prune.rate=1.5", r"prune.rate: must be in \(0, 1\)"),
    ("prune.base_sparsity=120", "prune.base_sparsity: must be within 0-100"),
    ("prune.td_rounds=[1,-1,3,4,5]", "round counts must be non-negative"),
    ("train.epochs", "--set expects section.field=value"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(LLTError, match=message):
        load_config("demo", [override])


def test_top_down_schedules_are_checked_up_front():
    with pytest.raises(LLTError, match="densities must not increase"):
        load_config("paper-cifar100-td", ["prune.td_densities=[0.8,0.9,0.5,0.4,0.3,0.2,0.2,0.1,0.1,0.05]"])
    with pytest.raises(LLTError, match="give either td_rounds or td_densities, not both"):
        load_config("paper-cifar100-td", ["prune.td_rounds=[1,1,1,1,1,1,1,1,1,1]"])
    with pytest.raises(LLTError, match="prune.td_rounds has 4 entries but the stream has 5 tasks"):
        load_config("paper-cifar10-td", ["prune.td_rounds=[1,1,3,4]"])
    load_config("paper-cifar10-bu", ["prune.td_rounds=[1,1,3,4]"])   # not Top-Down: the schedule is unused


def test_unknown_preset_suggests_a_close_name():
    with pytest.raises(LLTError, match=r"unknown preset 'paper-cifar10-tdd' \(did you mean 'paper-cifar10-td'\?\)"):
        load_config("paper-cifar10-tdd")


def test_preset_with_unknown_section_or_key(tmp_path):
    (tmp_path / "p.yaml").write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(LLTError, match="unknown config section 'trainer'"):
        load_config(str(tmp_path / "p.yaml"))
    (tmp_path / "q.yaml").write_text("extends: demo\ntrain:\n  epoch: 3\n")
    with pytest.raises(LLTError, match="did you mean train.epochs"):
        load_config(str(tmp_path / "q.yaml"))


def test_extends_merges_sections(tmp_path):
    (tmp_path / "child.yaml").write_text("extends: paper-cifar10-td\ntrain:\n  epochs: 7\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.01 and cfg.prune.td_rounds == (1, 1, 3, 4, 5)


def test_defaults_are_the_papers():
    cfg = RunConfig()
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay, cfg.train.batch_size) == (0.01, 0.9, 5e-4, 256)
    assert (cfg.teaching.neighbours, cfg.teaching.temperature, cfg.prune.rate, cfg.prune.finetune_epochs) == (50, 2.0, 0.2, 30)
    assert cfg.prune.finetune_lr == 1e-4 and cfg.prune.decision_split == "val"


def test_configuration_doc_matches_the_code():
    from pathlib import Path

    from llt.configdoc import fields_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert doc.endswith(fields_markdown()), "regenerate with: llt show-config --fields --markdown"
    for preset in REQUIRED:
        assert f"`{preset}`" in doc
