"""HTTP client cost per request: http.client (what RemoteCalculator uses), urllib3 and httpx against one `mlip serve`.

Each client sends the same msgpack POST /v1/calculate (one aspirin structure) over one keep-alive
connection; the body names a model the server does not serve, so the server answers 404 at once and
what differs between the columns is the client alone. Rounds alternate the clients (ABC ABC ...).
"""

from __future__ import annotations

import time
from typing import Callable

from common import Server, aspirin_frames, machine_info, markdown_table, md_parser, require_checkpoint, settings_of, summarize_ms, write_json


def clients(url: str, body: bytes) -> dict[str, Callable[[], Callable[[], int]]]:
    """Per client library: a factory of one persistent connection's request function (returns the status)."""
    import httpx
    import urllib3

    from mlip import wire
    from mlip.http_connection import HTTPConnection

    headers = {"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK}

    def stdlib() -> Callable[[], int]:
        conn = HTTPConnection(url, {}, 60.0)
        return lambda: conn.post("/v1/calculate", body, headers)[0]

    def with_urllib3() -> Callable[[], int]:
        pool = urllib3.PoolManager(maxsize=1)
        return lambda: pool.request("POST", f"{url}/v1/calculate", body=body, headers=headers).status

    def with_httpx() -> Callable[[], int]:
        client = httpx.Client(base_url=url, timeout=60.0)
        return lambda: client.post("/v1/calculate", content=body, headers=headers).status_code

    return {"http.client": stdlib, "urllib3": with_urllib3, "httpx": with_httpx}


def main() -> None:
    parser = md_parser(__doc__.splitlines()[0], "http_clients")
    parser.add_argument("--requests", type=int, default=1000, help="timed requests per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from mlip import wire
    from mlip.remote import _structure

    (atoms,) = aspirin_frames(args.data, 1)
    body = wire.packb({"model": "no-such-model", "structures": [_structure(atoms)], "properties": ["energy", "forces"]})
    info = machine_info(1)
    times: dict[str, list[float]] = {}
    with Server(require_checkpoint(args.checkpoint), 1, "float64") as server:
        factories = clients(server.url, body)
        for _ in range(args.rounds):
            for name, factory in factories.items():
                send = factory()
                for _ in range(50):  # warm-up: connection, code paths
                    assert send() == 404, "the server should refuse the unknown model"
                for _ in range(args.requests):
                    start = time.perf_counter()
                    send()
                    times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
    rows = [{"client": name, **summarize_ms(t)} for name, t in times.items()]
    write_json(args.out, {"benchmark": "http_clients", "machine": info, "settings": settings_of(args), "results": rows})
    print(markdown_table(["client", "ms/request (median)", "mean", "p10", "p90"],
                         [[r["client"], r["median_ms"], r["mean_ms"], r["p10_ms"], r["p90_ms"]] for r in rows]))  # fmt: skip


if __name__ == "__main__":
    main()
