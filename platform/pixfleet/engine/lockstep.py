"""Batched forwards for code written one image at a time.

controlnet_aux's annotators take one image per call and run their networks on a batch of one,
with their own pre- and post-processing around each forward. `Lockstep.map` runs one such call
per image, each in a thread of its own, and the networks handed to `Lockstep.batched` stand in
for the originals: a forward waits until every other running call is waiting on a forward too
(or has returned), then the inputs of the same network and shape go through it as one batch and
each call gets its own slice back. The calls' own code runs unchanged, so each map is the one
controlnet_aux's call makes (equal up to float rounding, which a batch may move: ~1e-7 seen on
CPU). Which forwards share a batch follows from the calls alone (the k-th forward of every call
still running), never from thread timing, so the same images make the same maps on every run.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)
class _Forward:
    """One call's forward, waiting for its round."""

    network: torch.nn.Module
    args: tuple
    kwargs: dict
    output: Any = None
    error: BaseException | None = None
    done: bool = False

    def batch_key(self) -> tuple | None:
        """Forwards with equal keys can share a batch: the same network, tensor arguments only,
        equal in all but the batch dimension. None: this forward runs alone."""
        if self.kwargs or not self.args or not all(isinstance(arg, torch.Tensor) for arg in self.args):
            return None
        return id(self.network), tuple((arg.shape[1:], arg.dtype, arg.device) for arg in self.args)

    def run_alone(self) -> None:
        try:
            self.output = self.network(*self.args, **self.kwargs)
        except BaseException as error:  # handed to the call that made the forward
            self.error = error


class Lockstep:
    """Runs per-image calls side by side and batches the forwards of their networks."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._calls_running = 0
        self._waiting: list[_Forward] = []
        self._member = threading.local()
        self._one_map_at_a_time = threading.Lock()

    def batched(self, network: torch.nn.Module) -> _BatchedNetwork:
        """`network` as the calls see it: called inside `map`, its forwards are batched."""
        return _BatchedNetwork(network, self)

    def map(self, call: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """`call(item)` for each item, in order. When calls raise, the first failed item's error
        is raised, after every call has returned."""
        if len(items) < 2:
            return [call(item) for item in items]
        with self._one_map_at_a_time, ThreadPoolExecutor(len(items), thread_name_prefix="lockstep") as pool:
            with self._condition:  # counted before any starts: no round goes before every call has had its turn
                self._calls_running = len(items)
            futures = [pool.submit(self._member_call, call, item) for item in items]
            return [future.result() for future in futures]

    def _member_call(self, call: Callable[[Any], Any], item: Any) -> Any:
        self._member.active = True
        try:
            return call(item)
        finally:
            with self._condition:
                self._calls_running -= 1
                self._run_round_if_every_call_waits()

    def forward(self, network: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        if not getattr(self._member, "active", False):
            return network(*args, **kwargs)
        request = _Forward(network, args, kwargs)
        with self._condition:
            self._waiting.append(request)
            self._run_round_if_every_call_waits()
            while not request.done:
                self._condition.wait()
        if request.error is not None:
            raise request.error
        return request.output

    def _run_round_if_every_call_waits(self) -> None:
        """With the condition held: when every running call waits on a forward, run them all.
        The others wait on the condition meanwhile, so the forwards run on this thread."""
        if not self._waiting or len(self._waiting) < self._calls_running:
            return
        requests, self._waiting = self._waiting, []
        groups: dict[tuple | int, list[_Forward]] = defaultdict(list)
        for request in requests:
            groups[request.batch_key() or id(request)].append(request)  # no key: a group of its own
        with torch.no_grad():  # the calls ask for none; this thread may be outside their no_grad
            for group in groups.values():
                _run_together(group)
        for request in requests:
            request.done = True
        self._condition.notify_all()


def _run_together(group: list[_Forward]) -> None:
    """One forward for the group, each request its slice; if the batch fails, each runs alone,
    so an error belongs to the call whose input raised it."""
    if len(group) > 1:
        sizes = [request.args[0].shape[0] for request in group]
        try:
            inputs = [torch.cat(parts) for parts in zip(*(request.args for request in group), strict=True)]
            outputs = _split(group[0].network(*inputs), sizes)
        except Exception:
            pass
        else:
            for request, output in zip(group, outputs, strict=True):
                request.output = output
            return
    for request in group:
        request.run_alone()


def _split(output: Any, sizes: list[int]) -> list[Any]:
    """A batched forward's output cut back into each request's: tensors along the batch
    dimension, lists and tuples element by element; anything else cannot be cut."""
    if output is None:
        return [None] * len(sizes)
    if isinstance(output, torch.Tensor):
        if output.shape[0] != sum(sizes):
            raise ValueError(f"output batch {output.shape[0]} is not the inputs' {sum(sizes)}")
        return list(output.split(sizes))
    if isinstance(output, list | tuple):
        parts = [_split(element, sizes) for element in output]
        return [type(output)(part[i] for part in parts) for i in range(len(sizes))]
    raise TypeError(f"cannot cut a {type(output).__name__} into per-request outputs")


class _BatchedNetwork:
    """A network whose calls go through its lockstep; everything else is the network's."""

    def __init__(self, network: torch.nn.Module, lockstep: Lockstep):
        self._network = network
        self._lockstep = lockstep

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._lockstep.forward(self._network, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)
