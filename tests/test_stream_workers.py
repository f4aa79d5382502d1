"""--workers: calibration statistics computed by forked worker processes, merged by the driver
(passes/stream_workers.py) — against the same statistics computed in one process."""

from __future__ import annotations

import functools
import os
import signal

import numpy as np
import onnx
import pytest

from models import llama_block
from qcompile.calib_data import model_input_specs, open_dataset
from qcompile.driver import compile_model
from qcompile.errors import DataError, UsageError
from qcompile.memory_plan import MemoryPlan, memory_needed
from qcompile.model_io import load_model
from qcompile.passes.calibrate import ObserverCollector
from qcompile.passes.equalization.stats import ChannelStatCollector, _first_rows
from qcompile.passes.hessians import GramCollector
from qcompile.passes.stream_workers import DatasetShard, WorkerDied, collect_groups
from qcompile.sharding import Sharding

LAYERS = 3


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> dict:
    return llama_block.write(tmp_path_factory.mktemp("decoder"), layers=LAYERS, calib_samples=10, eval_samples=4)


def _linear_inputs(model):
    return list({n.inputs[0].name: n.inputs[0] for n in model.graph if n.op_type == "MatMul"
                 and n.inputs[1] is not None and n.inputs[1].const_value is not None}.values())


def _collect(model, values, dataset, make, **kw):
    merged = {}
    for part in collect_groups(model, values, dataset, make, samples=100, label="test", progress=False, **kw):
        merged.update(part)
    return merged


def _memory(model, tmp_path, workers=2):
    """A bound under which each of `workers` streams a layer or so per block."""
    layer = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                if v.const_value is not None and ".layers.0." in v.name)
    return MemoryPlan(memory_needed(int(layer * 1.2)) * workers, tmp_path / "scratch")


def test_a_shard_is_every_nth_batch(decoder):
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    whole = [feed["input_ids"] for feed in data.batches(3)]
    shards = [[feed["input_ids"] for feed in DatasetShard(data, i, 2).batches(3)] for i in range(2)]
    assert len(whole) == 4 and [len(s) for s in shards] == [2, 2]
    for i, feed in enumerate(whole):
        np.testing.assert_array_equal(shards[i % 2][i // 2], feed)


@pytest.mark.parametrize("layerwise", [False, True])
def test_sharded_hessians_are_the_single_process_ones(decoder, tmp_path, layerwise):
    """Gram sums add: two workers' partials give the one-process Hessians up to float64
    summation order (and the same row counts), whole-model and block by block."""
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    xs = _linear_inputs(model)
    keys_of = {x.name: [x.name] for x in xs}
    make = lambda: GramCollector(keys_of, {}, 0)   # noqa: E731
    memory = _memory(model, tmp_path) if layerwise else None
    one = _collect(model, xs, data, make, memory=memory)
    two = _collect(model, xs, data, make, memory=memory, sharding=Sharding(2))
    assert one.keys() == two.keys() == {x.name for x in xs}
    for key, (gram, rows) in one.items():
        assert two[key][1] == rows > 0
        np.testing.assert_allclose(two[key][0], gram, rtol=1e-12, atol=1e-9 * np.abs(gram).max(), err_msg=key)


@pytest.mark.parametrize("layerwise", [False, True])
def test_sharded_channel_statistics_are_the_single_process_ones(decoder, tmp_path, layerwise):
    """SmoothQuant's and AWQ's statistics: per-channel extremes and the sampled rows, exactly
    (rows are drawn per tensor and batch; the sample is the first rows in batch order)."""
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    xs = _linear_inputs(model)
    make = lambda: ChannelStatCollector(40, 6, {}, None)   # noqa: E731  (10 batches of 6 rows > 40)
    memory = _memory(model, tmp_path, workers=3) if layerwise else None
    one = _collect(model, xs, data, make, memory=memory)
    three = _collect(model, xs, data, make, memory=memory, sharding=Sharding(3))
    assert one.keys() == three.keys() == {x.name for x in xs}
    for name, (lo, hi, kept) in one.items():
        np.testing.assert_array_equal(three[name][0], lo)
        np.testing.assert_array_equal(three[name][1], hi)
        rows = _first_rows(kept, 40, conv=False)
        assert rows.shape[0] == 40
        np.testing.assert_array_equal(_first_rows(three[name][2], 40, conv=False), rows)


def test_sharded_histograms_keep_exact_extremes_and_counts(decoder):
    """Observers merge: min, max and the value count exactly; a percentile within one bin of
    the final grid (merging re-bins a worker's counts at its bin centres)."""
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    xs = _linear_inputs(model)
    names = [x.name for x in xs]
    make = lambda: ObserverCollector(names, 128, {names[0]: -1})   # noqa: E731
    one = _collect(model, xs, data, make)
    two = _collect(model, xs, data, make, sharding=Sharding(2))
    for name in names:
        a, b = one[name], two[name]
        assert (a.min, a.max, a.count) == (b.min, b.max, b.count)
        lo_a, hi_a = a.range("percentile", percentile=99.9)
        lo_b, hi_b = b.range("percentile", percentile=99.9)
        bin_width = max(a.width, b.width) * (1 + 1e-9)   # one bin, up to the rounding of the bin edges
        assert abs(hi_a - hi_b) <= bin_width and abs(lo_a - lo_b) <= bin_width
    np.testing.assert_allclose(two[names[0]].channel_sum, one[names[0]].channel_sum, rtol=1e-12)
    np.testing.assert_array_equal(two[names[0]].channel_absmax, one[names[0]].channel_absmax)


class _PidCollector:
    """Which processes saw which tensor; optionally dies (SIGKILL) in its first process."""

    def __init__(self, die_flag=None, always_die=False):
        self.seen, self.die_flag, self.always_die = {}, die_flag, always_die

    def update(self, name, array, batch):
        if self.always_die or (self.die_flag is not None and not self.die_flag.exists()):
            if self.die_flag is not None:
                self.die_flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        self.seen.setdefault(name, set()).add((os.getpid(), int(np.asarray(array).shape[0])))

    def take(self, names):
        return {n: self.seen.pop(n) for n in names if n in self.seen}

    @staticmethod
    def merge(parts):
        out = {}
        for part in parts:
            for name, seen in part.items():
                out.setdefault(name, set()).update(seen)
        return out


def test_workers_are_other_processes(decoder):
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    xs = _linear_inputs(model)[:1]
    seen = _collect(model, xs, data, _PidCollector, sharding=Sharding(3))
    pids = {pid for pid, _ in seen[xs[0].name]}
    assert len(pids) == 3 and os.getpid() not in pids


def test_a_worker_that_dies_once_is_started_again(decoder, tmp_path):
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    xs = _linear_inputs(model)[:1]
    flag = tmp_path / "died-once"
    seen = _collect(model, xs, data, lambda: _PidCollector(flag), sharding=Sharding(2))
    assert flag.exists()
    assert sum(n for _, n in seen[xs[0].name]) <= 10 and len({pid for pid, _ in seen[xs[0].name]}) == 2


def test_a_worker_that_dies_twice_ends_the_compile_naming_its_shard(decoder):
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    xs = _linear_inputs(model)[:1]
    with pytest.raises(WorkerDied, match=r"shard 1 of 2 .*died twice \(killed by SIGKILL\)"):
        _collect(model, xs, data, lambda: _PidCollector(always_die=True), sharding=Sharding(2))


class _DataErrorCollector(_PidCollector):
    def update(self, name, array, batch):
        raise DataError("NaN in this worker's batch", hint="clean the data")


def test_an_error_in_a_worker_is_raised_as_it_is(decoder):
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    xs = _linear_inputs(model)[:1]
    with pytest.raises(DataError, match="NaN in this worker's batch") as err:
        _collect(model, xs, data, _DataErrorCollector, sharding=Sharding(2))
    assert err.value.hint == "clean the data"


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-gptq", "w8a8-smooth", "w4a16-awq"])
def test_a_compile_with_two_workers_writes_the_single_process_model(decoder, tmp_path, recipe):
    common = dict(recipe=recipe, calib=decoder["calib"], verify_data=decoder["eval"], progress=False)
    one = compile_model(decoder["model"], output_dir=tmp_path / "one", **common)
    two = compile_model(decoder["model"], output_dir=tmp_path / "two", sharding=Sharding(2), **common)
    a, b = _initializers(tmp_path / "one" / "model.onnx"), _initializers(tmp_path / "two" / "model.onnx")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert one.report["verification"]["outputs"] == two.report["verification"]["outputs"]
    assert two.report["sharding"] == {"workers": 2, "ray": None} and "sharding" not in one.report


def test_a_worker_share_too_small_for_a_block_is_refused_before_forking(decoder, tmp_path):
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    xs = _linear_inputs(model)[:1]
    memory = _memory(model, tmp_path, workers=1)
    with pytest.raises(UsageError, match=r"with --workers 2 each worker streams under 1/2 of --max-memory"):
        _collect(model, xs, data, _PidCollector, memory=memory, sharding=Sharding(2))


def test_workers_below_one_are_refused(run_cli, decoder, tmp_path):
    result = run_cli([str(decoder["model"]), "--workers", "0", "-o", str(tmp_path / "o")])
    assert result.code == 2 and "--workers must be at least 1" in result.err


# -- Ray: the same shards as tasks on a local cluster started here ----------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is the optional extra qcompile[ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=200 * 2**20)
    import sys
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # this file's collectors travel by value
    yield ray
    ray.shutdown()


def test_ray_tasks_give_the_single_process_statistics(decoder, tmp_path, local_ray):
    """Hessians and SmoothQuant's channel statistics from two Ray tasks (graph and batches
    shipped to them) against one process: the same rows, the same sums."""
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    xs = _linear_inputs(model)
    keys_of = {x.name: [x.name] for x in xs}
    grams = functools.partial(GramCollector, keys_of, {}, 0)
    one, two = _collect(model, xs, data, grams), _collect(model, xs, data, grams, sharding=Sharding(2, "auto"))
    assert one.keys() == two.keys()
    for key, (gram, rows) in one.items():
        assert two[key][1] == rows
        np.testing.assert_allclose(two[key][0], gram, rtol=1e-12, atol=1e-9 * np.abs(gram).max(), err_msg=key)
    stats = functools.partial(ChannelStatCollector, 40, 6, {}, None)
    one, two = _collect(model, xs, data, stats), _collect(model, xs, data, stats, sharding=Sharding(2, "auto"))
    for name, (lo, hi, kept) in one.items():
        np.testing.assert_array_equal(two[name][0], lo)
        np.testing.assert_array_equal(two[name][1], hi)
        np.testing.assert_array_equal(_first_rows(two[name][2], 40, conv=False), _first_rows(kept, 40, conv=False))


def test_a_compile_on_ray_writes_the_single_process_model(decoder, tmp_path, local_ray):
    common = dict(recipe="w8a8-smooth", calib=decoder["calib"], verify_data=decoder["eval"], progress=False)
    compile_model(decoder["model"], output_dir=tmp_path / "one", **common)
    compile_model(decoder["model"], output_dir=tmp_path / "ray", sharding=Sharding(2, "auto"), **common)
    a, b = _initializers(tmp_path / "one" / "model.onnx"), _initializers(tmp_path / "ray" / "model.onnx")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_an_error_in_a_ray_task_is_raised_as_it_is(decoder, local_ray):
    model = load_model(decoder["model"])
    data = open_dataset(decoder["calib"], model_input_specs(model))
    with pytest.raises(DataError, match="NaN in this worker's batch"):
        _collect(model, _linear_inputs(model)[:1], data, _DataErrorCollector, sharding=Sharding(2, "auto"))


def test_a_ray_address_that_does_not_answer_is_refused_at_once(run_cli, decoder, tmp_path):
    """No minutes of ray.init retries and no silent fallback to local work."""
    import socket
    with socket.socket() as sock:           # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_cli([str(decoder["model"]), "--calib", str(decoder["calib"]), "--ray", f"127.0.0.1:{port}",
                      "-o", str(tmp_path / "o")])
    assert result.code == 2 and f"the Ray cluster at 127.0.0.1:{port} does not answer" in result.err
    assert not (tmp_path / "o").exists()
    result = run_cli([str(decoder["model"]), "--ray", "not an address", "-o", str(tmp_path / "o")])
    assert result.code == 2 and "is not HOST:PORT" in result.err
