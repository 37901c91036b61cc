"""What checking an artifact's files on every load costs: `Workspace.resolve` with a warm hash cache
(the normal case: seeded at publish) and a cold one (first load in a copied workspace), against
hashing the files outright, which is what verification would cost without the cache.

The artifact is one file of --mb megabytes plus --files small files, published through the store.

    python benchmarks/bench_verify.py                 # 256 MB + 200 small files
    python benchmarks/bench_verify.py --mb 1024 --files 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from llmctl.stages.runner import _file_records
from llmctl.workspace.manifest import file_sha256, now_iso
from llmctl.workspace.store import Workspace


def publish(ws: Workspace, mb: int, files: int):
    run = ws.begin_run("bench", "h")
    out = run / "output"
    with (out / "model.safetensors").open("wb") as handle:
        for _ in range(mb):
            handle.write(os.urandom(1 << 20))
    for i in range(files):
        (out / f"shard_{i:05d}.bin").write_bytes(os.urandom(4096))
    fields = dict(
        stage="bench",
        kind="model",
        started_at=now_iso(),
        finished_at=now_iso(),
        llmctl_version="bench",
        config={},
        config_hash="h",
        files=_file_records(out),
    )
    return ws.publish(run, fields)


def timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp) / "ws")
        artifact = publish(ws, args.mb, args.files)
        cache_file = ws.hashes.path

        def cold() -> None:
            cache_file.unlink(missing_ok=True)
            Workspace(ws.root).resolve("bench:latest")

        def warm() -> None:
            Workspace(ws.root).resolve("bench:latest")

        def unverified() -> None:
            Workspace(ws.root).resolve("bench:latest", verify=False)

        def hash_all() -> None:
            for record in artifact.manifest.files:
                file_sha256(artifact.path / record.path)

        rows = [
            ("resolve, warm cache (normal)", timed(warm, args.repeats)),
            ("resolve, cold cache", timed(cold, args.repeats)),
            ("resolve, verify=False", timed(unverified, args.repeats)),
            ("sha256 of every file (no cache)", timed(hash_all, args.repeats)),
        ]
    print(f"artifact: {args.mb} MB + {args.files} small files; median of {args.repeats}")
    for name, seconds in rows:
        print(f"  {name:34s} {seconds * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
