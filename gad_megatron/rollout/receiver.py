"""The engine end of a weight group, whatever the engine.

vLLM receives in its own worker processes (`join_weight_group` / `receive_weights` on its
adapter). The other engines receive here: the process holding the engine joins the group as
one rank and loads each bucket with the engine's `update_weights` (hf has no processes of its
own; SGLang's distributed update API wants its manifest out of band, which this protocol
does not do yet, so it loads through `update_weights_from_tensor`). Either way the trainer's
side is the same `GroupTransport`, so no weight ever travels through Ray's object store or an
engine's RPC serialiser.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

from gad_megatron.resharding.broadcast import GroupTransport, receive_weights
from gad_megatron.resharding.execute import SyncMismatch
from gad_megatron.resharding.weight_group import DEFAULT_TIMEOUT_S, WeightGroup


def checkpoint_manifest(model_dir: str, dtype: str) -> dict:
    """name -> (shape, dtype name) of every tensor in `model_dir`'s safetensors files: the
    HF-named weights the engine serves, as a sync must send them. `dtype`: the dtype the
    engine runs in (vLLM casts what it loads to it, so a sync must send that dtype)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file to read the weights' "
                                f"names and shapes from")
    expected = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                expected[name] = (tuple(f.get_slice(name).get_shape()), dtype)
    config = Path(model_dir) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("tie_word_embeddings"):
        # Some writers store the tied copy anyway; the trainer's export never sends it.
        expected.pop("lm_head.weight", None)
    return expected


class HostReceiver:
    """Receives for an engine living in this process. `engine.weight_manifest()` gives the
    weights the engine holds, by HF name (what a sync's manifest is checked against)."""

    weight_receivers = 1

    def __init__(self, engine, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.engine, self.timeout_s = engine, timeout_s
        self.group: WeightGroup | None = None

    def join_weight_group(self, addr: str, port: int, world: int, first_rank: int,
                          backend: str = "gloo") -> None:
        self.group = WeightGroup(addr, port, world, first_rank, backend, self.timeout_s)

    def receive_weights(self) -> tuple[int, int]:
        if self.group is None:
            raise RuntimeError("receive_weights before join_weight_group")
        return receive_weights(self.group, self.engine.update_weights,
                               self.engine.weight_manifest())


def has_own_receivers(engine) -> bool:
    """Whether `engine` receives weights in processes of its own (vLLM's workers), so that
    even a sender in the engine's own process must broadcast to them."""
    return hasattr(engine, "receive_weights")


def receiver_for(engine, timeout_s: float = DEFAULT_TIMEOUT_S):
    """The object that joins weight groups for `engine`: itself when it receives in its own
    processes, else a HostReceiver around it."""
    return engine if has_own_receivers(engine) else HostReceiver(engine, timeout_s)


class Background:
    """Run `fn()` in a thread; `result()` joins it and re-raises what it raised."""

    def __init__(self, fn: Callable[[], object]):
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as err:  # handed to the caller of result()
            self.error = err

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


class LocalLink:
    """A weight group on loopback between this process (rank 0, the sender) and the
    receivers of an engine held here: vLLM's workers are other processes, so even an
    in-process sync into vLLM travels by broadcast. Joining happens once, here."""

    def __init__(self, receiver, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S):
        from gad_megatron.parallel.launch import LOOPBACK, free_port

        self.receiver = receiver
        port, world = free_port(LOOPBACK), 1 + receiver.weight_receivers
        joining = Background(lambda: receiver.join_weight_group(LOOPBACK, port, world, 1,
                                                                backend))
        self.group = WeightGroup(LOOPBACK, port, world, 0, backend, timeout_s)
        joining.result()

    def sync(self, send: Callable[[GroupTransport], object]) -> tuple[int, int]:
        """Run `send(transport)` (begin, buckets, finish) here while the engine receives.
        Returns the receivers' (buckets, bytes)."""
        receiving = Background(self.receiver.receive_weights)
        try:
            send(GroupTransport(self.group))
        except SyncMismatch:
            try:
                receiving.result()  # the receivers refused the same manifest, for one reason
            except Exception:  # noqa: BLE001 - the sender's SyncMismatch says why
                pass
            raise
        return receiving.result()
