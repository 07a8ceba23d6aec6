"""Defect 6 of issue 14: a weight-sync bucket must serialise to about its payload.

At TP=1 the export yields live parameters; with Megatron's distributed optimizer those are
views into one contiguous buffer, and pickling a view (Ray's object store) ships its whole
storage. Measured before the fix: a 1/9 slice of a tensor pickled to the size of the tensor.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from gad_megatron.resharding.execute import SyncStats, _Bucketer, owned, owns_storage
from gad_megatron.resharding.transport import CallbackTransport

MIB = 1 << 20


def test_pickling_a_view_ships_its_whole_storage():
    """The library behaviour the fix exists for (if torch ever changes it, this says so)."""
    flat = torch.zeros(9 * MIB // 4)  # 9 MiB of fp32, one storage
    view = flat[: MIB // 4]  # 1 MiB slice
    assert len(pickle.dumps(view)) > 8 * MIB
    assert len(pickle.dumps(owned(view))) < MIB + 4096


@pytest.mark.parametrize("make,expect", [
    (lambda b: b, True),  # a whole tensor owns its storage
    (lambda b: b[:4], False),  # prefix view: storage is larger
    (lambda b: b[4:], False),  # offset view
    (lambda b: b.view(4, 4).t(), False),  # non-contiguous
    (lambda b: b[:4].clone(), True),
])
def test_owns_storage_table(make, expect):
    assert owns_storage(make(torch.arange(16.0))) is expect


def test_a_bucket_of_views_serialises_to_its_payload():
    # One contiguous "parameter buffer" of 8 MiB (fp32 and bf16 halves), cut into named views
    # the way Megatron's distributed optimizer lays parameters out.
    buffer = torch.randn(2 * MIB)
    named = [(f"layer{i}.weight", buffer[i * MIB // 8:(i + 1) * MIB // 8].view(256, -1))
             for i in range(16)]
    named.append(("head.weight", buffer.bfloat16()[: MIB // 2]))
    sizes: list[tuple[int, int]] = []  # (serialised bytes, payload bytes) per bucket

    def ship(bucket):
        payload = sum(t.numel() * t.element_size() for _, t in bucket)
        sizes.append((len(pickle.dumps(bucket)), payload))

    stats = SyncStats()
    bucketer = _Bucketer(CallbackTransport(ship), 2 * MIB, stats)
    for name, tensor in named:
        bucketer.add(name, tensor)
    bucketer.flush()
    assert len(sizes) == stats.buckets >= 3
    for serialised, payload in sizes:
        assert payload <= serialised <= payload * 1.02 + 16384, (serialised, payload)
    # the values travel unchanged
    first = pickle.loads(pickle.dumps(owned(named[3][1])))
    assert torch.equal(first, named[3][1])
