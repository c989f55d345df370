"""The sweep driver's watch on its tracking server (moco_ray.tuning.outage): a blip is ridden out, an outage that
outlasts the grace period stops the sweep, local stores are never probed. A fake probe and clock (the network
edge); the real server is killed and restarted in tests/cli/test_sweep_tracking_outage.py."""

from __future__ import annotations

from moco_ray.tracking.store import server_problem
from moco_ray.tuning.outage import TrackingWatch


class _Server:
    def __init__(self) -> None:
        self.t, self.up, self.probes = 0.0, True, 0

    def probe(self, uri: str, timeout: float) -> str | None:
        self.probes += 1
        return None if self.up else "Connection refused"


def _watch(server: _Server, lines: list[str], grace: float = 30.0) -> TrackingWatch:
    return TrackingWatch("http://mlflow:5000", grace, clock=lambda: server.t, probe=server.probe, say=lines.append)


def _advance(server: _Server, watch: TrackingWatch, seconds: float, step: float = 0.5) -> bool:
    stopped = False
    for _ in range(int(seconds / step)):
        server.t += step
        stopped = watch.poll() or stopped
    return stopped


def test_a_blip_shorter_than_the_grace_is_ridden_out():
    server, lines = _Server(), []
    w = _watch(server, lines)
    assert not _advance(server, w, 60)
    server.up = False
    assert not _advance(server, w, 20)  # down for 20 s < 30
    server.up = True
    assert not _advance(server, w, 60) and not w.down
    assert len(lines) == 2 and "not answering (Connection refused)" in lines[0] and "answers again" in lines[1]
    assert server.probes <= 160 / w.every + 2  # polled every few seconds, not every loop step


def test_an_outage_longer_than_the_grace_stops_the_sweep():
    server, lines = _Server(), []
    w = _watch(server, lines)
    _advance(server, w, 10)
    server.up = False
    assert not _advance(server, w, 25)
    assert _advance(server, w, 15) and w.down
    probes = server.probes
    server.up = True
    assert w.poll() and server.probes == probes  # decided: no more probes, the sweep is stopping
    msg = w.message("moco-ray sweep -c s.yaml --resume")
    assert msg.startswith("MLflow server http://mlflow:5000 unreachable for 30 s (Connection refused)")
    assert msg.endswith("continue with: moco-ray sweep -c s.yaml --resume")


def test_local_stores_are_not_watched(tmp_path):
    server = _Server()
    server.up = False
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "mlruns")):
        w = TrackingWatch(uri, 1.0, clock=lambda: server.t, probe=server.probe, say=lambda _: None)
        assert not _advance(server, w, 10)
    assert server.probes == 0


def test_the_real_probe_names_the_refusal():
    from moco_helpers import free_port

    assert "refused" in server_problem(f"http://127.0.0.1:{free_port()}", timeout=2).lower()
    assert server_problem("sqlite:///x.db") is None


def test_a_trial_failing_under_an_outage_waits_for_the_stop_and_fails_if_the_server_returns():
    from moco_ray.tuning.outage import wait_while_down

    server = _Server()
    sleep = lambda s: setattr(server, "t", server.t + s)  # noqa: E731
    assert not wait_while_down("http://mlflow:5000", 300, server.probe, sleep, lambda: server.t)  # up: fail now
    assert server.t == 0
    server.up = False
    assert wait_while_down("http://mlflow:5000", 300, server.probe, sleep, lambda: server.t)
    assert 300 <= server.t <= 305  # waited for the driver's stop (here it never comes: the limit ends it)

    def back_at_40(uri, timeout):
        server.probes += 1
        return None if server.t >= 40 else "Connection refused"

    server.t = 0
    assert wait_while_down("http://mlflow:5000", 300, back_at_40, sleep, lambda: server.t) and 40 <= server.t < 45
    assert not wait_while_down("sqlite:///x.db", 300, server.probe, sleep, lambda: server.t)  # never for local
