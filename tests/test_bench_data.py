"""`make bench`'s movement section at a toy shape: the controller's data work of a gad step
runs through the real Role code in both forms, and the array form sends fewer bytes."""

from __future__ import annotations

import pickle

import numpy as np


def test_movement_before_and_after_at_a_toy_shape():
    from gad_megatron.bench_data import controller_side, paper_batch

    batch = paper_batch(prompts=4, n=2)
    before_s, before_bytes = controller_side(*batch, arrays=False)
    after_s, after_bytes = controller_side(*batch, arrays=True)
    assert before_s > 0 and after_s > 0
    # Lists pickle each token; arrays travel as 4-byte ids, and a replica's shard once.
    assert after_bytes < before_bytes


def test_sequences_travel_as_arrays():
    from gad_megatron.workers.sequences import Sequences

    seqs = Sequences([[1, 2], [3]], [[4], [5, 6, 7]],
                     fields={"advantage": np.array([0.5, -0.5], np.float32),
                             "old_logprobs": [np.zeros(1, np.float32), np.ones(3, np.float32)]})
    assert all(p.dtype == np.int32 for p in seqs.prompts + seqs.responses)
    part = seqs.take([1])
    assert part.responses[0].tolist() == [5, 6, 7] and part.fields["advantage"].tolist() == [-0.5]
    buffers: list = []
    pickle.dumps(seqs, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) >= 4  # the token arrays left the pickle stream as buffers
