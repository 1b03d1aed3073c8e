"""Run directories written before the TrainState restructuring still resume, exactly.

tests/fixtures/checkpoints_v0/<case>/ are run directories as moejax at commit 3d6c7c8 wrote
them (`TrainState.router_bias` and `TrainState.lora_state` as separate fields; see
tests/fixtures/make_old_checkpoints.py, which made them and documents the cases): each
stopped after step 2 of a 3-step run, with `<case>.reference.json` beside it recording
what the uninterrupted run did next. Each case is resumed the way a user would, by calling
`train(config, workdir)` with the config the run saved in its `config.json`, and

  - the step-3 loss (and cross-entropy) equals the uninterrupted run's, bit for bit;
  - the step-3 checkpoint the resumed run writes holds, leaf for leaf, the bytes of the
    uninterrupted run's (step 3 is a function of the restored state, the data position
    and the config, so this checks the restore of every leaf, including that the
    non-trainable collections came back into the model: each of them changes the step-3
    loss by more than 5e-3 here, and their sign-rule update continues from the restored
    values);
  - adapter runs: the run's own frozen base (`<run>/base`) still matches the fingerprint
    recorded in the old checkpoint (the resume refuses otherwise, and the new checkpoint's
    reference equals the old one), and `load_adapted(workdir, step=2)` returns the old
    checkpoint's adapters and non-trainable collections exactly;
  - an old run used as `lora.base_checkpoint` of a new adapter run gives it its step-2
    params and router bias exactly.

Exactness: every step-2 comparison (the fixture, `load_adapted`, the old run as a base) is
bit for bit. Step 3 is computed by today's code, whose arithmetic is no longer the
generator's: the 2-D projections (moejax/nn/projection.py, issue 16) reorder float32 sums,
which moves step-3 leaves by up to 3e-6 relative. So step 3 is compared within float32
rounding (`STEP3_RTOL`: the losses to 1e-6 relative, each leaf's sum to 1e-5 relative +
1e-6), three orders of magnitude below what a wrong restore does (each non-trainable
collection alone moves the step-3 loss by more than 5e-3). Do not regenerate the fixture
with a later moejax: it must stay what commit 3d6c7c8 wrote.

Leaves are compared by a name that does not depend on which TrainState field holds them:
the old path with `lora_state/` removed, so "router_bias/...", "lora_bias/...",
"lora_frozen/..." start at the collection name; a leaf of the new checkpoint matches when
its path ends with that name (e.g. "<any field>/router_bias/moe_layers/moe/router/bias").
The checkpoints are read with orbax directly, without a restore target.
"""

import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from fixtures.make_old_checkpoints import layout_free_name, leaf_record, read_state
from flax import traverse_util

from moejax.train.adapter_checkpoint import check_fingerprint, fingerprint, load_adapted
from moejax.train.checkpoint import Checkpointer
from moejax.train.loop import train

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints_v0"
CASES = ("moe", "sigmoid_bias", "flylora", "smora")
ADAPTER_CASES = ("flylora", "smora")
# Step 3 within float32 rounding of the generator's arithmetic (module docstring).
STEP3_RTOL = {"loss": 1e-6, "leaf_sum": 1e-5, "leaf_sum_atol": 1e-6, "values": 1e-5}
# Each case's non-trainable collections (the old TrainState fields they lived in).
COLLECTIONS = {
    "moe": (),
    "sigmoid_bias": ("router_bias",),  # TrainState.router_bias
    "flylora": ("lora_bias", "lora_frozen"),  # TrainState.lora_state
    "smora": ("router_bias", "lora_bias"),  # both
}


def _reference(case: str) -> dict:
    with open(FIXTURES / f"{case}.reference.json") as f:
        return json.load(f)


def _saved_config(workdir) -> ml_collections.ConfigDict:
    """The config a run saved in its workdir: what resuming it with the same command uses."""
    with open(pathlib.Path(workdir) / "config.json") as f:
        return ml_collections.ConfigDict(json.load(f))


def _match(recorded: dict, flat: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """{recorded name: leaf of `flat`}: each recorded name matches the one path of `flat`
    equal to it or ending with "/" + it."""
    out = {}
    for name in recorded:
        hits = [k for k in flat if k == name or k.endswith("/" + name)]
        if len(hits) > 1 and name in hits:
            hits = [name]
        assert len(hits) == 1, f"{where}: recorded leaf {name!r} matches {hits} of {sorted(flat)}"
        out[name] = flat[hits[0]]
    return out


def _assert_leaves_equal(recorded: dict, leaves: dict[str, np.ndarray], where: str) -> None:
    """Every leaf's shape, dtype and bytes as recorded (`[shape, dtype, sha256, sum]`)."""
    differ = []
    for name, want in sorted(recorded.items()):
        got = leaf_record(np.asarray(leaves[name]))
        if got[:3] != want[:3]:
            differ.append(f"{name}: {got[0]} {got[1]} sum {got[3]!r}, recorded {want}")
    if differ:
        pytest.fail(f"{where}: {len(differ)} leaves differ:\n" + "\n".join(differ))


def _assert_leaves_close(recorded: dict, leaves: dict[str, np.ndarray], where: str) -> None:
    """Every leaf's shape and dtype as recorded, and its bytes, or else its sum within
    `STEP3_RTOL` of the recorded sum."""
    differ = []
    for name, want in sorted(recorded.items()):
        got = leaf_record(np.asarray(leaves[name]))
        close = abs(got[3] - want[3]) <= (
            STEP3_RTOL["leaf_sum"] * abs(want[3]) + STEP3_RTOL["leaf_sum_atol"]
        )
        if got[:2] != want[:2] or (got[2] != want[2] and not close):
            differ.append(f"{name}: {got[0]} {got[1]} sum {got[3]!r}, recorded {want}")
    if differ:
        pytest.fail(f"{where}: {len(differ)} leaves differ:\n" + "\n".join(differ))


@pytest.mark.parametrize("case", CASES)
def test_fixture_is_intact(case):
    """The fixture's step-2 checkpoint holds the recorded bytes (read by orbax alone)."""
    ref = _reference(case)
    flat = {
        layout_free_name(k): v
        for k, v in read_state(FIXTURES / case / "checkpoints" / str(ref["saved_step"])).items()
    }
    assert sorted(flat) == sorted(ref["leaves"]["2"])
    _assert_leaves_equal(ref["leaves"]["2"], flat, f"{case} fixture step 2")
    for collection in COLLECTIONS[case]:
        assert any(k.startswith(collection + "/") for k in flat), (case, collection)


@pytest.mark.parametrize(  # sigmoid_bias: router_bias; smora: lora_state and router_bias
    "case",
    [
        c if c in ("sigmoid_bias", "smora") else pytest.param(c, marks=pytest.mark.slow)
        for c in CASES
    ],
)
def test_old_run_resumes_as_if_uninterrupted(case, tmp_path):
    # One train() per case (a test each would compile it again under pytest-xdist).
    ref = _reference(case)
    workdir = tmp_path / "run"
    shutil.copytree(FIXTURES / case, workdir)
    config = _saved_config(workdir)
    assert config.train.steps == ref["resume_to"] == 3
    metrics = train(config, str(workdir))

    # The resumed step 3 computes the uninterrupted run's loss (within float32 rounding).
    assert metrics["step"] == 3 and metrics["train/nonfinite_total"] == 0
    for key in ("loss", "ce_loss"):
        got, want = metrics[f"train/{key}"], ref["step3"][key]
        assert abs(got - want) <= STEP3_RTOL["loss"] * abs(want), (case, key, got, want)

    # ... and saves the uninterrupted run's step-3 state, leaf for leaf.
    recorded = ref["leaves"]["3"]
    flat = read_state(workdir / "checkpoints" / "3")
    _assert_leaves_close(recorded, _match(recorded, flat, case), f"{case} step 3")
    for name, values in ref["values"]["3"].items():
        np.testing.assert_allclose(
            np.asarray(_match({name: None}, flat, case)[name], np.float64),
            np.asarray(values, np.float64),
            rtol=STEP3_RTOL["values"],
            atol=STEP3_RTOL["leaf_sum_atol"],
            err_msg=f"{case} step 3 {name}",
        )

    if case in ADAPTER_CASES:
        _check_adapter_run(case, ref, workdir)


def _check_adapter_run(case: str, ref: dict, workdir: pathlib.Path) -> None:
    # The resumed run found its own base (<run>/base) to be the one the old checkpoint was
    # trained on (train() raises BaseModelError otherwise), and refers to it the same way.
    with Checkpointer(workdir, async_save=False) as ckpt:
        old, new = ckpt.read_extra(2)["base"], ckpt.read_extra(3)["base"]
    assert old == ref["base"]
    assert new["kind"] == old["kind"] == "own" and new["path"] == str(workdir / "base")
    check_fingerprint(old["fingerprint"], new["fingerprint"], {"kind": "own", "path": ""}, 2)
    # The old step through the inference loader: base + adapters + collections, exactly.
    _, variables = load_adapted(str(workdir), step=2)
    base_names = ref["base"]["fingerprint"]  # "path/to/leaf" of every base parameter
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    base = traverse_util.unflatten_dict({k: v for k, v in params.items() if k in base_names}, "/")
    check_fingerprint(base_names, fingerprint(base), {"kind": "own", "path": ""}, 2)
    flat = {
        "/".join(k): np.asarray(v)
        for k, v in traverse_util.flatten_dict(jax.device_get(variables)).items()
    }
    recorded = {
        k: v
        for k, v in ref["leaves"]["2"].items()
        if k.split("/", 1)[0] in ("params",) + COLLECTIONS[case]
    }
    assert any(k.startswith("params/") for k in recorded)
    _assert_leaves_equal(recorded, _match(recorded, flat, case), f"{case} load_adapted step 2")
    for name, values in ref["values"]["2"].items():  # the readable copies agree too
        np.testing.assert_array_equal(flat[name], np.asarray(values, flat[name].dtype))


def test_old_run_as_the_base_of_an_adapter_run(tmp_path):
    """An old run with DeepSeek-V3 routing as `lora.base_checkpoint` of a new adapter run:
    its step-2 params and router bias (old `TrainState.router_bias`) are what it loads."""
    ref = _reference("sigmoid_bias")
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "sigmoid_bias", base)
    config = _saved_config(base)
    config.lora.update(method="lora", targets="attn.wq", rank=1, base_checkpoint=str(base))
    config.moe.bias_update_rate = 0.0  # the router bias stays as loaded
    config.train.update(steps=1, checkpoint_every=1)
    train(config, str(tmp_path / "adapters"))
    _, variables = load_adapted(str(tmp_path / "adapters"))
    flat = {
        "/".join(k): np.asarray(v)
        for k, v in traverse_util.flatten_dict(jax.device_get(variables)).items()
    }
    recorded = {
        k: v for k, v in ref["leaves"]["2"].items() if k.startswith(("params/", "router_bias/"))
    }
    assert any(k.startswith("router_bias/") for k in recorded)
    _assert_leaves_equal(recorded, _match(recorded, flat, "base"), "old run as a base")
