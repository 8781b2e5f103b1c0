#!/usr/bin/env python3
"""Fuzz ``quench serve --grpc-port`` with malformed v2 gRPC messages (loopback).

Starts ``quench serve ARTIFACT`` with both listeners on free ports, then sends, for each RPC
(``ModelInfer`` with raw and with typed contents, ``ModelMetadata``, ``ModelReady``,
``RepositoryIndex``), ``--cases`` variants of a valid message: bytes flipped, the message cut,
random bytes spliced in, or random bytes only (seeded). It then reads the server's own count of
answers by gRPC status from ``/metrics``: the run fails when any answer was INTERNAL or UNKNOWN,
the server logged a traceback, or it did not exit 0 on SIGTERM (the ``bench/fuzz.py`` rules).

    .venv/bin/python bench/fuzz_grpc.py model.quench --cases 500 --seed 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import grpc
import numpy as np
from common import (
    answers_by_status,
    free_port,
    get_json,
    get_json_index,
    mutations,
    random_input,
    stop,
    wait_ready,
)
from tritonclient.grpc import service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
CRASHES = {"INTERNAL", "UNKNOWN"}


def valid_messages(meta: dict, name: str) -> dict[str, list[bytes]]:
    inp, shape, x = random_input(meta, 1, 0)
    raw = pb.ModelInferRequest(
        model_name=name,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=inp, datatype="FP32", shape=shape)],
        raw_input_contents=[x],
    )
    typed = pb.ModelInferRequest()
    typed.CopyFrom(raw)
    typed.ClearField("raw_input_contents")
    typed.inputs[0].contents.fp32_contents.extend(np.frombuffer(x, "<f4").tolist())
    return {
        "ModelInfer": [raw.SerializeToString(), typed.SerializeToString()],
        "ModelMetadata": [pb.ModelMetadataRequest(name=name, version="1").SerializeToString()],
        "ModelReady": [pb.ModelReadyRequest(name=name).SerializeToString()],
        "RepositoryIndex": [pb.RepositoryIndexRequest(ready=True).SerializeToString()],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--cases", type=int, default=500, help="malformed messages per valid one")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    port, gport = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "quench", "serve", a.artifact, "--quiet"]
    cmd += ["--port", str(port), "--grpc-port", str(gport)]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    seen: dict[str, int] = {}
    try:
        wait_ready(base, timeout=300)
        name = get_json_index(base)[0]["name"]
        messages = valid_messages(get_json(base, f"/v2/models/{name}"), name)
        rng = np.random.default_rng(a.seed)
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as channel:
            for method, valid in messages.items():
                rpc = channel.unary_unary(f"/{SERVICE}/{method}")
                for data in valid:
                    for bad in mutations(data, a.cases, rng):
                        try:
                            rpc(bad, timeout=60)
                            code = "OK"
                        except grpc.RpcError as exc:
                            code = exc.code().name
                        seen[code] = seen.get(code, 0) + 1
        counts = answers_by_status(base, "GRPC")
    finally:
        stop(server, timeout=60)
    err = server.stderr.read() if server.stderr else ""
    crashes = sum(n for s, n in {**seen, **counts}.items() if s in CRASHES)
    tracebacks = err.count("Traceback")
    print(
        json.dumps(
            {
                "messages": sum(seen.values()),
                "client_saw": dict(sorted(seen.items())),
                "server_answered": dict(sorted(counts.items())),
                "internal_or_unknown": crashes,
                "tracebacks": tracebacks,
                "server_exit": server.returncode,
            }
        )
    )
    return 1 if crashes or tracebacks or server.returncode != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
