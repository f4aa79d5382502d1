"""The benchmarks' library: what the thin CLIs (tools/bench.py, tools/bench_decoder.py) are made of.

* measure.py   — measured subprocesses (wall time, exact peak RSS), CpuWatch, run environment,
                 the child protocol (child.py KIND SPEC -> one `@@RESULT` line)
* peers.py     — the one catalog of onnxruntime.quantization peers and how each is run
* compiles.py  — the qcompile CLI run the same way
* evaluate.py  — sessions, running models, output metrics (qcompile.verify's) and task metrics
* latency.py   — latency, one way: a fresh process per pass (forward passes; decode steps)
* setups.py    — the models and data of the model bench
* suite.py     — one model's bench: rows, ratios, summary, acceptance bars
* render.py    — bench.md / bench.png and the shared table formatting
* decoder.py   — the decoder bench's models, compile rows, decode fidelity and markdown

Import it with tools/ on sys.path (`from benchlib import measure`); nothing is imported here,
so a child process loads only what its kind needs.
"""
