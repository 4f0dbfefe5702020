"""Live metrics: the latest round record of each hosted peer, served for Prometheus (--metrics-port)."""

from __future__ import annotations

from typing import Any


class PromExporter:
    """Serves the latest round record of this peer for Prometheus scraping (--metrics-port).

    A private registry, so several peers in one process (tests) do not collide; numeric fields of
    the record become gauges `p2pfl_<field>{peer="<id>"}`, created as they first appear."""

    def __init__(self, port: int, peer: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self._gauge_cls = Gauge
        self.registry = CollectorRegistry()
        self.peer = str(peer)
        self.gauges: dict[str, Any] = {}
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)

    def update(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key == "peer" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key not in self.gauges:
                self.gauges[key] = self._gauge_cls(f"p2pfl_{key}", f"p2pfl per-round metric {key}", ["peer"], registry=self.registry)
            self.gauges[key].labels(peer=str(record.get("peer", self.peer))).set(value)  # co-hosted peers: one exporter

    def close(self) -> None:
        self.server.shutdown()
