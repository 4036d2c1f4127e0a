"""The test world is reproducible: its files' sha256 and its accuracies are pinned (built in the
builder's isolated, pinned process: opd_tasks/toy/world.py). A failure here means the world moved:
on an unchanged builder, something of this machine leaks into the build (report it); after a
deliberate builder change, bump BUILDER_VERSION, re-pin these values and re-measure README's numbers."""
import hashlib
import json

from opd_tasks.toy.world import BUILDER_VERSION

PINNED_SHA256 = {
    "student/model.safetensors": "7ab16be678309c9083679164cfbb8ec19ba34ced8f20c05b770b31d8f463dfea",
    "teachers/add/model.safetensors": "f0e4019c7a99862481a29115720fec1596f6aeea4314e9b202138eb3757f9bb8",
    "teachers/rev/model.safetensors": "d5b0a96f7077f39b172595731faaff1ac4a12f67e5acf006a90f697acce0ade3",
    "data/train.parquet": "334a751a6da2e44719d172d8fda2176ac27ffc49d32c6c20f194ab793ffcc051",
    "data/eval.parquet": "03a36bf073c161e50b3a9f3da7bb7b145b3ecfdba76bcbf62250ffed7f5d511c",
}
PINNED_ACCURACY = {"student": {"add": 0.265625, "rev": 0.203125}, "adder": {"add": 0.578125, "rev": 0.0},
                   "reverser": {"add": 0.078125, "rev": 1.0}}


def test_the_test_world_has_the_pinned_weights_and_accuracies(toy_world):
    world = json.loads((toy_world / "world.json").read_text())
    assert world["builder_version"] == BUILDER_VERSION == 4 and (world["size"], world["seed"]) == ("test", 0)
    got = {rel: hashlib.sha256((toy_world / rel).read_bytes()).hexdigest() for rel in PINNED_SHA256}
    assert got == PINNED_SHA256
    assert world["accuracy"] == PINNED_ACCURACY
    assert world["steps"] == {"student": 360, "adder": 80, "reverser": 20}
