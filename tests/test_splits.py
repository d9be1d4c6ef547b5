"""Patient-level splits: no patient on two sides, counts and fractions, seeds, explicit files, phantom hardness."""

import json

import pytest

from ssmis.config.schema import SplitConfig
from ssmis.data.adapter import Item
from ssmis.data.phantom import PhantomAdapter
from ssmis.data.splits import Splits, make_splits, random_splits
from ssmis.errors import UserError


def _items(n_pat=20, per=3, unlabeled_only=()):
    return [Item(f"p{p:02d}_s{k}", f"p{p:02d}", p not in unlabeled_only, "x") for p in range(n_pat) for k in range(per)]


def _side_of(splits):
    return {c.split("_")[0]: part for part in ("labeled", "unlabeled", "val", "test") for c in getattr(splits, part)}


def test_counts_fractions_and_no_leakage():
    items = _items()
    s = random_splits(items, items, labeled=3, val=0.1, test=0.2, seed=0)
    pats = {part: {c.split("_")[0] for c in getattr(s, part)} for part in ("labeled", "unlabeled", "val", "test")}
    assert [len(pats[p]) for p in ("labeled", "val", "test")] == [3, 2, 4]
    assert len(pats["unlabeled"]) == 20 - 3 - 2 - 4
    all_sets = list(pats.values())
    for i in range(4):
        for j in range(i + 1, 4):
            assert not all_sets[i] & all_sets[j]
    # every slice of a labelled patient is labelled
    assert len(s.labeled) == 9


def test_seeded_and_seed_dependent():
    items = _items()
    a = random_splits(items, items, 3, 0.1, 0.2, seed=0)
    b = random_splits(items, items, 3, 0.1, 0.2, seed=0)
    c = random_splits(items, items, 3, 0.1, 0.2, seed=1)
    assert a.to_json() == b.to_json()
    assert (a.labeled, a.test) != (c.labeled, c.test)


def test_unlabelled_only_patients_never_labelled_or_evaluated():
    items = _items(unlabeled_only={0, 1, 2, 3, 4})
    for seed in range(5):
        s = random_splits(items, [i for i in items if i.has_label], 0.5, 0.2, 0.2, seed)
        side = _side_of(s)
        assert all(side[f"p{p:02d}"] == "unlabeled" for p in range(5))


def test_too_many_labelled_is_a_user_error():
    items = _items(n_pat=5)
    with pytest.raises(UserError, match="labeled"):
        random_splits(items, items, labeled=10, val=1, test=1, seed=0)


def test_explicit_file_is_checked_for_leakage(tmp_path):
    adapter = PhantomAdapter()
    ids = [it.id for it in adapter.items("train")]
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"labeled": ids[:2], "unlabeled": ids[2:10], "val": ids[10:12], "test": ids[12:14]}))
    s = make_splits(adapter, SplitConfig(file=str(good)))
    assert s.labeled == ids[:2]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"labeled": ids[:2], "unlabeled": ids[1:10], "val": ids[10:12], "test": []}))
    with pytest.raises(UserError, match="both labeled and unlabeled"):
        make_splits(adapter, SplitConfig(file=str(bad)))
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"labeled": ["nope"], "val": []}))
    with pytest.raises(UserError, match="unknown cases"):
        make_splits(adapter, SplitConfig(file=str(typo)))


def test_splits_json_round_trip(tmp_path):
    s = Splits(["a"], ["b"], ["c"], ["d"], {"rule": "x"})
    p = tmp_path / "s.json"
    p.write_text(s.to_json())
    assert Splits.read(p) == s


def test_labeled_scans_label_exactly_those_scans():
    adapter = PhantomAdapter()
    base = make_splits(adapter, SplitConfig(labeled=2, val=1, test=2))
    train = base.labeled + base.unlabeled
    pick = [train[3], train[0]]
    s = make_splits(adapter, SplitConfig(labeled=2, val=1, test=2, labeled_scans=pick))
    assert s.labeled == [train[0], train[3]]                       # the split's order, not the list's
    assert s.unlabeled == [c for c in train if c not in pick] and (s.val, s.test) == (base.val, base.test)
    patients = {it.id: it.patient for it in adapter.items("train")}
    assert s.meta["labeled_cases"] == 2 and s.meta["unlabeled_cases"] == len(train) - 2
    assert s.meta["labeled_patients"] == len({patients[c] for c in pick})     # not the base split's count
    assert "unlabeled_patients" not in s.meta
    with pytest.raises(UserError, match="val/test scans"):
        make_splits(adapter, SplitConfig(labeled=2, val=1, test=2, labeled_scans=[base.test[0]]))
