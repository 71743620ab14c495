"""Probe: what loading the default pair's GGUF files costs, step by step.

Loading a GGUF is two steps: parsing its header (metadata, among them the tokenizer's 151k
strings and 151k merges, and the tensor table) and dequantising each tensor to float32. This
times, for each file of the default pair:

* **open** - ``gguf.GGUFReader`` as shipped against `mirror_jax.loading.gguf_loader._open` (the same
  reader reading through a plain ndarray view of its memory map), interleaved, median of
  ``--repeats``; both must give identical fields and tensors (checked);
* **dequantise** - ``gguf.dequantize`` of every tensor, per quantisation type (the file's pages are
  read once before, so this is the arithmetic, not the disk).

    python experiments/probe_gguf_open.py

Writes ``experiments/results/probe_gguf_open.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results  # noqa: E402
from mirror_jax.loading.default_pair import assemble_default_files  # noqa: E402
from mirror_jax.loading.gguf_loader import _open  # noqa: E402


def _same(a, b) -> bool:
    if list(a.fields) != list(b.fields):
        return False
    for k in a.fields:
        x, y = a.fields[k].contents(), b.fields[k].contents()
        if not (np.array_equal(x, y) if isinstance(y, np.ndarray) else x == y):
            return False
    return all(s.name == t.name and np.array_equal(s.data, t.data) for s, t in zip(a.tensors, b.tensors, strict=True))


def probe_file(path: Path, repeats: int) -> dict:
    import gguf

    times = {"gguf.GGUFReader": [], "mirror_jax _open": []}
    for i in range(repeats):
        order = list(times) if i % 2 == 0 else list(times)[::-1]
        for name in order:
            t0 = time.perf_counter()
            reader = gguf.GGUFReader(str(path), "r") if name == "gguf.GGUFReader" else _open(path)
            times[name].append(time.perf_counter() - t0)
    ref, ours = gguf.GGUFReader(str(path), "r"), _open(path)
    same = _same(ours, ref)
    for t in reader.tensors:  # fault the pages in: time the arithmetic below, not the disk
        np.asarray(t.data).sum()
    deq: dict[str, list] = {}
    for t in reader.tensors:
        t0 = time.perf_counter()
        w = gguf.dequantize(t.data, t.tensor_type)
        d = deq.setdefault(t.tensor_type.name, [0, 0.0])
        d[0] += int(w.size)
        d[1] += time.perf_counter() - t0
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"file": path.name, "open_s": med, "open_speedup": med["gguf.GGUFReader"] / med["mirror_jax _open"],
            "identical": same, "dequantise": {k: {"elements_m": n / 1e6, "seconds": s, "m_per_s": n / 1e6 / s}
                                              for k, (n, s) in deq.items()},
            "dequantise_s": sum(s for _, s in deq.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="probe_gguf_open")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    a = ap.parse_args(argv)
    files = [probe_file(p, a.repeats) for p in assemble_default_files()]
    payload = {"machine": machine_info(), "command": "python experiments/probe_gguf_open.py "
               + " ".join(argv if argv is not None else sys.argv[1:]), "files": files}
    rows = [[f["file"], f["open_s"]["gguf.GGUFReader"], f["open_s"]["mirror_jax _open"], f["open_speedup"],
             f["identical"], f["dequantise_s"],
             ", ".join(f"{k} {v['elements_m']:.0f}M at {v['m_per_s']:.0f}M/s" for k, v in f["dequantise"].items())]
            for f in files]
    cols = ["file", "open s (gguf reader)", "open s (mirror_jax)", "speed-up", "identical", "dequantise s",
            "per type"]
    md = (f"# Loading the default pair's GGUF files\n\n{machine_md(payload['machine'])}\n\n"
          f"Command: `{payload['command'].strip()}`\n\nopen: median of {a.repeats} interleaved openings "
          "(the header, the tokenizer arrays, the tensor table); dequantise: `gguf.dequantize` of every "
          "tensor to float32, pages already read.\n\n"
          + markdown_table(rows, cols, fmt={c: "{:.2f}" for c in cols[1:4] + ["dequantise s"]}))
    write_results(a.out, a.name, payload, md)
    print(md)
    return 0 if all(f["identical"] for f in files) else 1


if __name__ == "__main__":
    sys.exit(main())
