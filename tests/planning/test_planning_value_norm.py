"""ValueNorm: exact running statistics, inverse transforms, state dicts."""

import numpy as np
import torch

from models.planning.value_norm import ValueNorm


def test_running_statistics_equal_those_of_all_data():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (5, 1, 40, 17)]
    norm = ValueNorm()
    for b in batches:
        norm.update(torch.tensor(b, dtype=torch.float32))
    everything = np.concatenate(batches).astype(np.float32).astype(np.float64)
    assert abs(float(norm.mean) - everything.mean()) < 1e-9
    assert abs(float(norm.var) - everything.var()) < 1e-9
    assert int(norm.count) == len(everything)
    norm.update(torch.zeros(0))  # empty batches change nothing
    assert int(norm.count) == len(everything)


def test_normalize_and_denormalize_are_inverse_and_standardise():
    norm = ValueNorm()
    data = torch.tensor([1.0, 5.0, 9.0, -3.0])
    norm.update(data)
    z = norm.normalize(data)
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std(unbiased=False)) - 1.0) < 1e-5
    assert torch.allclose(norm.denormalize(z), data, atol=1e-5)


def test_state_dict_round_trip():
    a, b = ValueNorm(), ValueNorm()
    a.update(torch.arange(10.0))
    b.load_state_dict(a.state_dict())
    x = torch.tensor([2.5, -1.0])
    assert torch.equal(a.normalize(x), b.normalize(x))
