"""`mlip ipi`: answer an i-PI server's force requests (path-integral, replica-exchange MD ...) with our potential.

i-PI drives the dynamics and sends positions and cell (atomic units) over its socket protocol;
this client returns energy, forces and virial. The protocol is ASE's ``SocketClient`` (the same
one ASE's ``SocketIOCalculator`` speaks), the answers come from the in-process potential or from
a running `mlip serve`. i-PI sends no elements, so ``--structure`` names them, in i-PI's atom order.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("mlip.ipi")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="HOST:PORT of i-PI's inet socket (<ffsocket mode='inet'>)")
    where.add_argument("--unix", metavar="NAME", help="name of i-PI's UNIX socket (<ffsocket mode='unix'>: /tmp/ipi_NAME)")
    parser.add_argument("--structure", required=True,
                        help="file ASE can read (i-PI's init.xyz): the elements in i-PI's order, and the periodicity")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default="aspirin-rmd17", help="a .safetensors file or a shipped name (in-process)")
    source.add_argument("--server", metavar="URL", help="answer through a running `mlip serve` (e.g. http://127.0.0.1:8000)")
    parser.add_argument("--model", help="model name on the server (default: its default model)")
    parser.add_argument("--device", default="cpu", help="in-process device: cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="in-process precision")
    parser.add_argument("--pbc", choices=["auto", "yes", "no"], default="auto",
                        help="periodic along all three cell vectors, or not (auto: as --structure says)")
    parser.add_argument("--wait", type=float, default=60.0, help="keep trying to reach i-PI this long, s (it may start later)")
    parser.add_argument("--timeout", type=float, default=None, help="give up when i-PI is silent this long, s (default: wait)")


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ``ValueError`` naming the problem."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address must be HOST:PORT, got {address!r}")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    from ase.calculators.socketio import SocketClient
    from ase.io import read

    from .cell import cell_has_stress

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = parse_address(args.address) if args.address else ("localhost", None)
    atoms = read(args.structure)
    if args.pbc != "auto":
        atoms.pbc = args.pbc == "yes"
    if args.server:
        from .remote import RemoteCalculator

        atoms.calc = RemoteCalculator(args.server, model=args.model, transport="ws")
    else:
        from .calculator import MLIPCalculator

        atoms.calc = MLIPCalculator(args.checkpoint, device=args.device, dtype=args.dtype)
    use_stress = cell_has_stress(atoms.cell.array, atoms.pbc)  # the virial: periodic cells of non-zero volume
    log.info("%d atoms (%s), %s, virial %s; connecting to i-PI at %s", len(atoms), atoms.get_chemical_formula(),
             args.server or args.checkpoint, "on" if use_stress else "off", args.unix or f"{host}:{port}")
    deadline = time.monotonic() + args.wait
    while True:
        try:
            client = SocketClient(host=host, port=port, unixsocket=args.unix, timeout=args.timeout)
            break
        except OSError as err:  # no socket yet, or refused: i-PI may still be starting
            if time.monotonic() > deadline:
                print(f"mlip ipi: error: cannot reach i-PI at {args.unix or args.address} within {args.wait:g} s ({err}); "
                      "is i-PI running?", file=sys.stderr)
                return 1
            time.sleep(0.2)
    try:  # a geometry the potential refuses is a ValueError: `mlip` prints it, i-PI sees the socket close
        steps = sum(1 for _ in client.irun(atoms, use_stress=use_stress))
    finally:
        client.close()
        if hasattr(atoms.calc, "close"):
            atoms.calc.close()
    log.info("i-PI sent EXIT after %d force evaluations", steps)
    return 0
