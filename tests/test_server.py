"""Policy server over real sockets on 127.0.0.1: protocol, sessions, auth, batching, fuzzing."""

from __future__ import annotations

import asyncio
import math
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as raw_connect

import envs
from dppo.cli import main as cli_main
from dppo.serving import protocol as P
from dppo.serving.client import connect, connect_async
from dppo.serving.codec import DTYPES, CodecError, decode_array, encode_array, pack, unpack
from dppo.serving.server import (
    PolicyServer,
    ServerConfig,
    ServerThread,
    load_runtime,
    split_state,
    stack_states,
    state_signature,
)
from policies.checkpoint import save_policy
from policies.diffusion import DiffusionPolicy, PolicyConfig
from policies.gpu import StaticChain
from policies.runtime import PolicyRuntime

TASK = "point_reach"
OBS_KEY = "state"
TO, TP, TA = 2, 8, 4
SAMPLER = {"name": "ddim", "steps": 4, "eta": 0.0}
SEED = 7
CONTROL_FREQ = 20.0
REPLY_TIMEOUT_S = 10.0


def tiny_policy(n_obs_steps: int = TO) -> DiffusionPolicy:
    """A small random-weight policy with point_reach's observation and action spaces."""
    env = envs.make_env(TASK)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    torch.manual_seed(0)
    return DiffusionPolicy(
        PolicyConfig(
            task=TASK,
            obs_shapes={OBS_KEY: [obs_dim]},
            action_dim=action_dim,
            n_obs_steps=n_obs_steps,
            horizon=TP,
            n_action_steps=TA,
            denoiser_kwargs={"hidden_dim": 32, "depth": 3},
            schedule={"num_train_steps": 20},
        )
    )


def tiny_checkpoint(folder: Path, n_obs_steps: int = TO) -> Path:
    return save_policy(tiny_policy(n_obs_steps), folder / "ckpt")


def env_observations(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` distinct real point_reach observations (6,) float32."""
    env = envs.make_env(TASK)
    out = [env.reset(seed=seed + i)[0] for i in range(n)]
    env.close()
    return out


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return tiny_checkpoint(tmp_path)


def start(checkpoint: Path, fast_path: str | None = None, **cfg) -> ServerThread:
    runtime = load_runtime(str(checkpoint), SAMPLER, seed=SEED, fast_path=fast_path)
    return ServerThread(
        PolicyServer(runtime, ServerConfig(port=0, control_freq=CONTROL_FREQ, **cfg))
    )


def in_process(checkpoint: Path) -> PolicyRuntime:
    return load_runtime(str(checkpoint), SAMPLER, seed=SEED)


def history(*steps: np.ndarray) -> dict[str, np.ndarray]:
    """The last To observations as a (1, To, D) batch, oldest first."""
    return {OBS_KEY: np.stack(steps[-TO:])[None]}


# -------------------------------------------------------------------------------------------
# Codec and protocol units
# -------------------------------------------------------------------------------------------
def test_codec_round_trips_every_allowed_dtype_and_byte_order():
    rng = np.random.default_rng(0)
    for name in sorted(DTYPES):
        a = (rng.standard_normal((3, 2)) * 10).astype(name)
        back = unpack(pack({"a": a}))["a"]
        assert back.dtype == np.dtype(name) and back.shape == (3, 2)
        np.testing.assert_array_equal(back, a)
        assert back.flags.writeable
    big_endian = np.arange(4, dtype=">f8")
    np.testing.assert_array_equal(decode_array(encode_array(big_endian)), big_endian)
    assert encode_array(big_endian)["data"] == np.arange(4, dtype="<f8").tobytes()
    with pytest.raises(TypeError, match="cannot be sent"):
        pack({"a": np.array(["x"])})


@pytest.mark.parametrize(
    "frame, reason",
    [
        (pack({"a": 1}) + b"\x00", "extra data"),
        (pack({"a": 1})[:-1], "incomplete"),
        (msgpack.packb({1: 2}), "map key"),
        (msgpack.packb(msgpack.ExtType(5, b"xy")), "ext"),
        (
            msgpack.packb({"__ndarray__": True, "dtype": "object", "shape": [1], "data": b"x"}),
            "dtype",
        ),
        (
            msgpack.packb(
                {"__ndarray__": True, "dtype": "float32", "shape": [2], "data": b"\0" * 4}
            ),
            "need 8",
        ),
        (
            msgpack.packb({"__ndarray__": True, "dtype": "uint8", "shape": [-1], "data": b""}),
            "non-negative",
        ),
        (
            msgpack.packb({"__ndarray__": True, "dtype": "uint8", "shape": [1] * 9, "data": b"x"}),
            "at most",
        ),
        (msgpack.packb({"__ndarray__": True, "dtype": "uint8", "shape": [1], "data": "x"}), "bin"),
        (b"\x91" * 10_000, "well-formed"),
    ],
)
def test_codec_rejects_malformed_frames(frame, reason):
    with pytest.raises(CodecError, match=reason):
        unpack(frame)


def test_observation_validation_casts_and_rejects():
    spec = {OBS_KEY: (6,)}
    one = P.validate_observation({OBS_KEY: np.arange(6, dtype=np.int64)}, spec, TO)
    assert one[OBS_KEY].shape == (1, 6) and one[OBS_KEY].dtype == np.float32
    two = P.validate_observation({OBS_KEY: np.zeros((2, 6))}, spec, TO)
    assert two[OBS_KEY].shape == (2, 6)
    bad = [
        ({}, "missing"),
        ({OBS_KEY: np.zeros(6), "extra": np.zeros(1)}, "unknown"),
        ({OBS_KEY: [0.0] * 6}, "ndarray"),
        ({OBS_KEY: np.zeros(5)}, "shape"),
        ({OBS_KEY: np.zeros((3, 6))}, "shape"),
        ({OBS_KEY: np.zeros((0, 6))}, "shape"),
        ({OBS_KEY: np.zeros(6, dtype=bool)}, "dtype"),
        ({OBS_KEY: np.array([0, 0, np.nan, 0, 0, 0])}, "non-finite"),
        ({OBS_KEY: np.array([0, 0, 0, 0, 0, 1e39])}, "non-finite"),
    ]
    for obs, reason in bad:
        with pytest.raises(P.ProtocolError, match=reason) as info:
            P.validate_observation(obs, spec, TO)
        assert info.value.code == P.BAD_OBSERVATION


def test_sampler_states_stack_and_split_per_session():
    states = [
        {"prev": torch.full((1, TP, 2), float(i)), "fresh": torch.tensor([i % 2 == 0])}
        for i in range(3)
    ]
    stacked = stack_states(states)
    assert stacked["prev"].shape == (3, TP, 2) and stacked["fresh"].tolist() == [True, False, True]
    for i, s in enumerate(split_state(stacked, 3)):
        torch.testing.assert_close(s["prev"], states[i]["prev"])
        assert s["prev"]._base is None  # owns its memory, not a view of the batch
    assert state_signature(states[0]) == state_signature(states[1])
    assert state_signature(states[0]) != state_signature({"prev": torch.zeros(1, TP, 3)})


# -------------------------------------------------------------------------------------------
# Server behaviour
# -------------------------------------------------------------------------------------------
def test_metadata_on_connect(checkpoint):
    with start(checkpoint) as server, connect(server.url) as client:
        meta = client.metadata
    assert meta["type"] == P.METADATA and meta["protocol_version"] == P.PROTOCOL_VERSION
    assert meta["task"] == TASK
    assert meta["obs_spec"] == {OBS_KEY: {"shape": [6], "dtype": "float32"}}
    assert meta["action_spec"] == {"shape": [TA, 2], "dtype": "float32"}
    assert (meta["n_obs_steps"], meta["horizon"], meta["n_action_steps"]) == (TO, TP, TA)
    assert meta["control_freq"] == CONTROL_FREQ
    assert meta["sampler"]["name"] == "ddim" and meta["sampler"]["n_steps"] == SAMPLER["steps"]
    assert meta["auth_required"] is False and meta["limits"]["max_batch"] >= 1


@pytest.mark.parametrize("fast_path", [None, "eager"])
def test_infer_round_trip_equals_in_process_runtime(checkpoint, fast_path):
    """Also through the static-chain fast path (``fast_path=eager``: bit-identical on a CPU)."""
    o1, o2, o3 = env_observations(3)
    local = in_process(checkpoint)
    expected = [
        local.act(history(o1, o1)).actions[0],
        local.act(history(o1, o2)).actions[0],
        local.act(history(o2, o3)).actions[0],
    ]
    with start(checkpoint, fast_path) as server, connect(server.url) as client:
        chain = server.server.runtime.sampler.diffusion
        assert isinstance(chain, StaticChain) == (fast_path is not None)
        got = [
            client.infer({OBS_KEY: o1}, reset=True),
            client.infer({OBS_KEY: o2}),
            client.infer({OBS_KEY: np.stack([o2, o3])}),
        ]  # a (k=2, D) history also works
    for reply, want in zip(got, expected, strict=True):
        assert reply.actions.shape == (TA, 2) and reply.actions.dtype == np.float32
        np.testing.assert_array_equal(reply.actions, want)
        assert reply.nfe == SAMPLER["steps"] and reply.batch_size == 1
        assert reply.inference_ms > 0 and reply.queue_ms >= 0 and reply.rtt_ms >= reply.server_ms
        assert abs(reply.server_time - time.time()) < 60
    assert [r.step for r in got] == [0, 1, 2]


def test_sessions_keep_separate_histories(checkpoint):
    a1, a2, b1, b2 = env_observations(4)
    local = in_process(checkpoint)  # replays the server's order of forward calls
    expected = [
        local.act(history(a1, a1)).actions[0],
        local.act(history(b1, b1)).actions[0],
        local.act(history(a1, a2)).actions[0],
        local.act(history(b1, b2)).actions[0],
    ]
    with start(checkpoint) as server, connect(server.url) as ca, connect(server.url) as cb:
        assert ca.metadata["session_id"] != cb.metadata["session_id"]
        assert server.server.n_sessions == 2
        got = [
            ca.infer({OBS_KEY: a1}),
            cb.infer({OBS_KEY: b1}),
            ca.infer({OBS_KEY: a2}),
            cb.infer({OBS_KEY: b2}),
        ]
    for reply, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(reply.actions, want)


def test_reset_message_starts_a_new_episode(checkpoint):
    o1, o2, o3 = env_observations(3)
    local = in_process(checkpoint)
    local.act(history(o1, o1))
    local.act(history(o1, o2))
    after_reset = local.act(history(o3, o3)).actions[0]  # padded history: nothing of o1, o2
    with start(checkpoint) as server, connect(server.url) as client:
        client.infer({OBS_KEY: o1})
        assert client.infer({OBS_KEY: o2}, step=41).step == 41  # the client's step is echoed
        client.reset()
        reply = client.infer({OBS_KEY: o3})
    np.testing.assert_array_equal(reply.actions, after_reset)
    assert reply.step == 0


def test_warm_started_sampler_state_lives_in_each_session(checkpoint):
    """RTI over the network: each session warm-starts from its own previous chunk."""
    rti = {"name": "rti", "base": "ddim", "base_steps": 4, "steps": [3, 1, 0], "eta": 0.0}
    a1, a2, a3, b1, b2 = env_observations(5)
    local = load_runtime(str(checkpoint), rti, seed=SEED)
    states = {}

    def expected(who: str, hist: dict, fresh: bool = False) -> tuple[np.ndarray, int]:
        """In-process reference: one runtime whose sampler state is swapped per stream."""
        if fresh or who not in states:
            states[who] = local.sampler.init_state(local.policy, 1, local.device)
        local.state = states[who]
        result = local.act(hist)
        states[who] = local.state
        return result.actions[0], result.nfe

    want = [
        expected("a", history(a1, a1)),
        expected("b", history(b1, b1)),
        expected("a", history(a1, a2)),
        expected("b", history(b1, b2)),
        expected("a", history(a3, a3), fresh=True),
    ]
    runtime = load_runtime(str(checkpoint), rti, seed=SEED)
    server = PolicyServer(runtime, ServerConfig(port=0, control_freq=CONTROL_FREQ))
    with ServerThread(server) as s, connect(s.url) as ca, connect(s.url) as cb:
        assert ca.metadata["sampler"]["name"] == "rti"
        got = [
            ca.infer({OBS_KEY: a1}),
            cb.infer({OBS_KEY: b1}),
            ca.infer({OBS_KEY: a2}),
            cb.infer({OBS_KEY: b2}),
        ]
        ca.reset()
        got.append(ca.infer({OBS_KEY: a3}))
    for reply, (actions, nfe) in zip(got, want, strict=True):
        np.testing.assert_array_equal(reply.actions, actions)
        assert reply.nfe == nfe
    assert [r.nfe for r in got] == [4, 4, 3, 3, 4]  # cold, cold, warm, warm, cold after reset


def _http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=REPLY_TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_and_token_auth(checkpoint):
    token = "s3cret-token"
    with start(checkpoint, token=token) as server:
        port = server.server.port
        assert _http_get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        for bad in (None, "wrong"):
            with pytest.raises(InvalidStatus) as info:
                connect(server.url, token=bad)
            assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            connect(f"{server.url}/?token=wrong")
        with connect(server.url, token=token) as client:
            assert client.metadata["auth_required"] is True
            assert client.infer({OBS_KEY: env_observations(1)[0]}).actions.shape == (TA, 2)
        with connect(f"{server.url}/?token={token}") as client:
            assert client.ping() > 0
        assert server.server.cfg.host == "127.0.0.1"


def test_sessions_beyond_the_limit_are_closed_with_try_again_later(checkpoint):
    with start(checkpoint, max_sessions=1) as server, connect(server.url) as first:
        with pytest.raises(ConnectionClosed) as info:
            connect(server.url)
        assert info.value.rcvd.code == 1013
        assert first.ping() > 0  # the admitted session is unaffected


def test_only_safetensors_checkpoints_are_served(tmp_path, capsys):
    pickled = tmp_path / "policy.pt"
    torch.save({"w": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="only safetensors"):
        load_runtime(str(pickled), SAMPLER)
    assert cli_main(["serve", f"checkpoint={pickled}"]) == 2
    assert "only safetensors" in capsys.readouterr().err
    assert cli_main(["serve", f"checkpoint={tmp_path}", "fast_path=jit"]) == 2
    assert "unknown fast_path 'jit'" in capsys.readouterr().err


def test_concurrent_requests_are_batched_into_fewer_forward_calls(checkpoint):
    n_clients = 6
    obs = [{OBS_KEY: o} for o in env_observations(n_clients)]

    async def burst(url: str) -> list:
        clients = [await connect_async(url) for _ in range(n_clients)]
        replies = await asyncio.gather(*(c.infer(o) for c, o in zip(clients, obs, strict=True)))
        await asyncio.gather(*(c.close() for c in clients))
        return replies

    for max_batch in (1, n_clients):
        with start(checkpoint, max_batch=max_batch, batch_window_ms=500.0) as server:
            forwards: list[int] = []

            def count(module, args, out, forwards=forwards):
                forwards.append(out.shape[0])

            hook = server.server.runtime.policy.denoiser.register_forward_hook(count)
            replies = asyncio.run(burst(server.url))
            hook.remove()
        calls = len(forwards) // SAMPLER["steps"]
        assert all(r.actions.shape == (TA, 2) for r in replies)
        assert sum(forwards) == n_clients * SAMPLER["steps"]  # every request denoised once
        if max_batch == 1:
            assert calls == n_clients and max(forwards) == 1
        else:
            assert calls < n_clients, f"{n_clients} requests took {calls} forward passes"
            assert max(r.batch_size for r in replies) > 1


# -------------------------------------------------------------------------------------------
# Fuzzing and misbehaving clients
# -------------------------------------------------------------------------------------------
FUZZ_MAX_BYTES = 64 * 1024
CLOSED = "closed"


def _nd(dtype: str, shape: list, data: bytes) -> dict:
    return {"__ndarray__": True, "dtype": dtype, "shape": shape, "data": data}


def _infer(obs, **extra) -> dict:
    return {"type": "infer", "id": 1, "obs": obs, **extra}


def malformed_frames(rng: np.random.Generator) -> list[tuple[bytes | str, set[str]]]:
    """(frame, acceptable outcomes): an error code, or CLOSED for the connection only."""
    good = pack(_infer({OBS_KEY: np.zeros(6, np.float32)}))
    frame, msg, obs = {P.BAD_FRAME}, {P.BAD_MESSAGE}, {P.BAD_OBSERVATION}
    cases: list[tuple[bytes | str, set[str]]] = []
    for _ in range(60):  # random bytes may happen to be a valid MessagePack scalar
        cases.append((rng.bytes(int(rng.integers(1, 200))), frame | msg))
    for _ in range(40):  # truncated requests
        cases.append((good[: int(rng.integers(1, len(good)))], frame))
    for _ in range(40):  # garbage after a valid request
        cases.append((good + rng.bytes(int(rng.integers(1, 50))), frame))
    cases += [
        ("a text frame", frame),
        ("{}", frame),
        (b"", frame),
        (b"\x91" * 5000, frame),
        (msgpack.packb({1: "int key"}), frame),
        (msgpack.packb(msgpack.ExtType(1, b"x")), frame),
        (b"\xa3\xff\xfe\xfd", frame),
        (msgpack.packb(msgpack.Timestamp(1)), frame),
    ]
    for value in (1, -3, 2.5, None, True, "infer", [1, 2], b"bytes", [{"type": "infer"}]):
        cases.append((pack(value), msg))
    for message in (
        {},
        {"type": 3},
        {"type": "nope"},
        {"type": "infer"},
        {"id": 1},
        _infer({OBS_KEY: np.zeros(6)}, id=[1]),
        _infer({OBS_KEY: np.zeros(6)}, id="x" * 500),
        _infer({OBS_KEY: np.zeros(6)}, reset=1),
        _infer({OBS_KEY: np.zeros(6)}, step=-1),
        _infer({OBS_KEY: np.zeros(6)}, step=2.0),
        _infer({OBS_KEY: np.zeros(6)}, client_time="now"),
        _infer({OBS_KEY: np.zeros(6)}, client_time=math.nan),
        _infer([1, 2]),
        _infer("obs"),
        {"type": "ping", "client_time": math.inf},
    ):
        cases.append((pack(message), msg))
    bad_obs = [
        {},
        {"other": np.zeros(6)},
        {OBS_KEY: np.zeros(6), "x": np.zeros(6)},
        {OBS_KEY: [0.0] * 6},
        {OBS_KEY: 1.0},
        {OBS_KEY: np.zeros(6, bool)},
        {OBS_KEY: np.zeros((TO + 1, 6))},
        {OBS_KEY: np.zeros((0, 6))},
        {OBS_KEY: np.zeros((1, 1, 6))},
        {OBS_KEY: np.zeros(())},
        {OBS_KEY: np.zeros(2000)},
        {OBS_KEY: np.zeros((1000, 6), np.float32)},
    ]
    for _ in range(60):  # wrong shapes and non-finite values
        shape = list(rng.integers(0, 9, size=int(rng.integers(0, 4))))
        if shape in ([6], [1, 6], [2, 6]):
            shape = [7]
        bad_obs.append({OBS_KEY: rng.standard_normal(shape).astype(np.float32)})
        values = rng.standard_normal(6)
        values[rng.integers(6)] = rng.choice([np.nan, np.inf, -np.inf, 1e39])
        bad_obs.append({OBS_KEY: values})
    cases += [(pack(_infer(o)), obs) for o in bad_obs]
    lying_arrays = [
        _nd("float32", [6], b"\0" * 20),
        _nd("float32", [10**6, 10**6], b"\0" * 24),
        _nd("float32", [-6], b""),
        _nd("float32", "6", b"\0" * 24),
        _nd("float32", [6.0], b"\0" * 24),
        _nd("complex64", [6], b"\0" * 48),
        _nd("O", [6], b"\0" * 48),
        _nd("float32", [6], "text"),
        {**_nd("float32", [6], b"\0" * 24), "extra": 1},
        {**_nd("float32", [6], b"\0" * 24), "__ndarray__": 1},
        _nd("float32", [1] * 20, b"\0" * 4),
    ]
    cases += [(msgpack.packb(_infer({OBS_KEY: a})), frame) for a in lying_arrays]
    oversized = np.zeros(FUZZ_MAX_BYTES // 4 + 16, np.float32)  # beyond max_message_bytes
    cases += [
        (pack(_infer({OBS_KEY: oversized})), {CLOSED}),
        (b"\0" * (FUZZ_MAX_BYTES + 1), {CLOSED}),
    ]
    order = rng.permutation(len(cases))
    return [cases[i] for i in order]


def test_fuzzed_frames_get_errors_and_the_server_keeps_serving(checkpoint):
    rng = np.random.default_rng(1234)
    cases = malformed_frames(rng)
    assert len(cases) >= 300
    good_obs = env_observations(1)[0]
    outcomes: dict[str, int] = {}
    with start(checkpoint, max_message_bytes=FUZZ_MAX_BYTES) as server:
        ws = None
        for i, (frame, acceptable) in enumerate(cases):
            if ws is None:
                ws = raw_connect(server.url, max_size=None, compression=None, proxy=None)
                assert unpack(ws.recv(timeout=REPLY_TIMEOUT_S))["type"] == P.METADATA
            try:
                ws.send(frame)
                reply = unpack(ws.recv(timeout=REPLY_TIMEOUT_S))
                outcome = reply["code"] if reply["type"] == P.ERROR else reply["type"]
                assert reply["type"] != P.ERROR or reply["message"]
            except ConnectionClosed as exc:
                outcome = CLOSED
                assert exc.rcvd is not None and exc.rcvd.code == 1009  # message too big
                ws = None
            assert outcome in acceptable, f"case {i}: {frame!r:.120} -> {outcome}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if i % 50 == 0 and ws is not None:  # the same connection still serves good requests
                ws.send(pack({"type": "infer", "id": "ok", "obs": {OBS_KEY: good_obs}}))
                assert unpack(ws.recv(timeout=REPLY_TIMEOUT_S))["type"] == P.ACTION
        if ws is not None:
            ws.close()
        with connect(server.url) as client:  # and a fresh well-formed client is served
            assert client.infer({OBS_KEY: good_obs}).actions.shape == (TA, 2)
        stats = server.server.stats
    assert outcomes[CLOSED] == 2 and outcomes[P.BAD_FRAME] > 100
    assert outcomes[P.BAD_MESSAGE] > 10 and outcomes[P.BAD_OBSERVATION] > 100
    assert stats.errors == len(cases) - outcomes[CLOSED]


def test_slow_reader_and_dropped_client_do_not_stall_others(checkpoint):
    n_unread, n_good = 300, 30
    obs = env_observations(1)[0]
    request = pack(_infer({OBS_KEY: obs}))
    with start(checkpoint) as server:
        # A client that keeps sending and never reads, with a tiny receive buffer.
        slow_sock = socket.socket()
        slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        slow_sock.connect(("127.0.0.1", server.server.port))
        slow = raw_connect(server.url, sock=slow_sock, max_queue=1, compression=None, proxy=None)
        for _ in range(n_unread):
            slow.send(request)
        # A client that sends a request and vanishes without a closing handshake.
        gone = socket.create_connection(("127.0.0.1", server.server.port))
        gone_ws = raw_connect(server.url, sock=gone, compression=None, proxy=None)
        gone_ws.send(request)
        gone.shutdown(socket.SHUT_RDWR)
        gone.close()
        start_time = time.perf_counter()
        with connect(server.url) as client:
            rtts = [client.infer({OBS_KEY: obs}).rtt_ms for _ in range(n_good)]
        elapsed = time.perf_counter() - start_time
        served_meanwhile = server.server.stats.infer_requests
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while server.server.n_sessions > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.server.n_sessions == 1  # the vanished client's session is gone
        slow_sock.shutdown(socket.SHUT_RDWR)
        slow_sock.close()
    assert len(rtts) == n_good and elapsed < REPLY_TIMEOUT_S
    assert served_meanwhile < n_unread + n_good + 1  # the slow reader had not been fully served
    assert float(np.median(rtts)) < 1000.0
