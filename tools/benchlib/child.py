"""The benches' one child process: `python tools/benchlib/child.py KIND SPEC_JSON`.

KIND: `peer` (an onnxruntime quantizer, measured by the parent), `latency` (one latency pass of
one model), `paired_latency` (several models alternating in one process), `decode_latency` (one process of decode-step timing), and the LLM peers'
(llm_peers.py): `llm_ckpt` (a GGUF to a Hugging Face checkpoint), `llm_eval` (perplexity of a
genai / llama.cpp / ONNX model over text windows), `llm_decode` (greedy decode tokens/s).
Prints one `@@RESULT {json}` line; exits 0 unless the result holds an error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
sys.path[0] = str(TOOLS)          # benchlib as a package, not this folder's modules as top-level ones


def main(argv: list[str]) -> int:
    kind, spec = argv[0], json.loads(argv[1])
    from benchlib.measure import print_result
    if kind == "peer":
        from benchlib.peers import quantize_in_child
        result = quantize_in_child(spec)
    elif kind == "latency":
        from benchlib.latency import latency_pass
        result = latency_pass(spec)
    elif kind == "paired_latency":
        from benchlib.latency import paired_latency_pass
        result = paired_latency_pass(spec)
    elif kind == "decode_latency":
        from benchlib.latency import decode_latency_pass
        result = decode_latency_pass(spec)
    elif kind == "llm_ckpt":
        from benchlib.llm_peers import hf_checkpoint_in_child
        result = hf_checkpoint_in_child(spec)
    elif kind == "llm_eval":
        from benchlib.llm_peers import lm_eval_in_child
        result = lm_eval_in_child(spec)
    elif kind == "llm_decode":
        from benchlib.llm_peers import decode_in_child
        result = decode_in_child(spec)
    else:
        result = {"error": f"unknown child kind {kind!r}"}
    print_result(result)
    return 1 if result.get("error") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
