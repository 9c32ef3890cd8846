"""Lockstep runs per-image calls side by side and batches their networks' forwards: one forward
per network and input shape in each round, each call its own slice of the output; calls that
stop early or fail do not hold up or fail the others."""

from __future__ import annotations

import pytest
import torch

from pixfleet.engine.lockstep import Lockstep

pytestmark = pytest.mark.timeout(60)


class Recording(torch.nn.Module):
    """A 1x1 convolution that records the batch size of each forward and returns a nested
    output, the shapes controlnet_aux's networks return (tensors, lists, None)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.batches: list[int] = []

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("a NaN in the input")
        self.batches.append(x.shape[0])
        y = self.conv(x)
        return y, [y.mean(dim=(1, 2, 3)), None]


def image(seed: int, side: int) -> torch.Tensor:
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_forwards_of_one_shape_go_as_one_batch_and_each_call_gets_its_own_slice():
    network, lockstep = Recording(), Lockstep()
    batched = lockstep.batched(network)
    inputs = [image(0, 8), image(1, 4), image(2, 8), image(3, 8)]

    outputs = lockstep.map(batched, inputs)

    assert sorted(network.batches) == [1, 3]  # the three 8 px images together, the 4 px one alone
    network.batches.clear()
    for x, (y, (mean, nothing)) in zip(inputs, outputs, strict=True):
        expected_y, (expected_mean, _) = network(x)
        assert y.shape == expected_y.shape == (1, 2, *x.shape[2:]) and nothing is None
        torch.testing.assert_close(y, expected_y)
        torch.testing.assert_close(mean, expected_mean)
    assert batched.conv is network.conv  # everything but the call is the network's


def test_calls_making_different_numbers_of_forwards_meet_in_rounds():
    network, lockstep = Recording(), Lockstep()
    batched = lockstep.batched(network)

    def refine(times: int) -> torch.Tensor:  # each forward takes the previous one's output
        x = image(times, 8)
        for _ in range(times):
            x = torch.cat([batched(x)[0], x[:, :1]], dim=1)
        return x

    outputs = lockstep.map(refine, [0, 1, 2, 3])

    assert network.batches == [3, 2, 1]  # round k: the k-th forward of every call still running
    lockstep_free = [refine(times) for times in range(4)]  # outside map: the network, one at a time
    assert network.batches[3:] == [1] * 6
    for got, expected in zip(outputs, lockstep_free, strict=True):
        torch.testing.assert_close(got, expected)


def test_a_failing_call_fails_alone_and_the_batch_it_was_in_still_runs():
    network, lockstep = Recording(), Lockstep()
    batched = lockstep.batched(network)
    finished: dict[int, torch.Tensor] = {}

    def call(index: int) -> torch.Tensor:
        if index == 1:
            raise RuntimeError("row 1 cannot be read")
        x = image(index, 8)
        if index == 2:
            x[0, 0, 0, 0] = float("nan")
        finished[index] = batched(x)[0]
        return finished[index]

    with pytest.raises(RuntimeError, match="row 1 cannot be read"):
        lockstep.map(call, [0, 1, 2, 3])

    assert sorted(finished) == [0, 3]  # row 2's forward raised its own error; 0 and 3 got theirs
    assert network.batches == [1, 1]  # the batch of three failed, so each ran alone
    torch.testing.assert_close(finished[3], network(image(3, 8))[0])
    with pytest.raises(ValueError, match="NaN"):
        lockstep.map(call, [2, 0])
