"""A second model version, shadowed on live traffic, and the rule that promotes it or rolls it back.

Why a file and not cells: the candidate is a real model file with its own ``model.json`` and version,
served by a real ``app.py`` process, and the rule that decides its fate must be tested on its own
(a rule that cannot say "roll back" is no rule). Imported by the chapter and the tests::

    from canary import make_candidate, shadow, decide
    candidate_path = make_candidate(model_path, out_dir, input_scale=1 / 16)
    records = shadow(live_url, candidate_url, bodies)      # every body to both versions
    verdict = decide(records)                              # {"decision": "promote" | "roll back", ...}

``python canary.py --help`` lists the flags of the rule (run against two servers already up).
"""

import argparse
import json
import os
import time
from pathlib import Path

#: The rule: enough mirrored requests, labels that agree with the live version, no slower tail, no 5xx.
RULE = {"min_requests": 100, "min_agreement": 0.99, "max_p99_ratio": 1.25}


def make_candidate(model_path, out_dir, input_scale: float = 1.0) -> Path:
    """Write a new version of the served ONNX model to ``out_dir``: the same graph behind a ``Mul`` by
    ``input_scale`` (1.0: the same predictions under a new version; 1/16: a pipeline that expects
    pixels already scaled to 0..1, the classic training/serving skew). Its ``model.json`` is the live
    one's with its own name and version (a hash of the file), written after the model."""
    import hashlib

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model_path, out_dir = Path(model_path), Path(out_dir)
    meta = json.loads((model_path.parent / "model.json").read_text())
    graph = onnx.load(str(model_path))
    name = graph.graph.input[0].name
    for node in graph.graph.node:
        node.input[:] = [f"{name}_rescaled" if i == name else i for i in node.input]
    graph.graph.initializer.append(numpy_helper.from_array(np.array(input_scale, np.float32), "input_scale"))
    graph.graph.node.insert(0, helper.make_node("Mul", [name, "input_scale"], [f"{name}_rescaled"]))
    onnx.checker.check_model(graph)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / model_path.name
    data = graph.SerializeToString()
    meta.update(name=f"{meta['name']}-candidate", version=hashlib.sha256(data).hexdigest()[:12],
                input_scale=input_scale)
    for target, content in ((path, data), (out_dir / "model.json", json.dumps(meta, indent=2).encode())):
        partial = target.with_suffix(target.suffix + ".partial")  # a reader never sees half a file
        partial.write_bytes(content)
        os.replace(partial, target)
    return path


def shadow(live_url: str, candidate_url: str, bodies: list[bytes], content_type: str = "application/octet-stream",
           timeout: float = 5.0) -> list[dict]:
    """Mirror every request: send it to the live version (whose answer the user gets) and then to the
    candidate (whose answer is only recorded); one record per request with both statuses, labels and
    latencies."""
    import httpx

    records = []
    with httpx.Client(timeout=timeout, headers={"content-type": content_type}) as client:
        for body in bodies:
            record = {}
            for role, url in (("live", live_url), ("candidate", candidate_url)):
                start = time.perf_counter()
                reply = client.post(f"{url}/predict", content=body)
                record[f"{role}_ms"] = 1e3 * (time.perf_counter() - start)
                record[f"{role}_status"] = reply.status_code
                record[f"{role}_labels"] = reply.json().get("labels") if reply.status_code == 200 else None
            records.append(record)
    return records


def decide(records: list[dict], min_requests: int = RULE["min_requests"], min_agreement: float = RULE["min_agreement"],
           max_p99_ratio: float = RULE["max_p99_ratio"]) -> dict:
    """Promote the candidate only if at least ``min_requests`` mirrored requests were compared, the
    candidate answered every one 200, its labels agree with the live version's on ``min_agreement`` of
    the rows, and its p99 latency is at most ``max_p99_ratio`` times the live one's; otherwise roll back,
    with every reason that failed."""
    import numpy as np

    rows = agree = 0
    for r in records:
        if r["live_labels"] is not None and r["candidate_labels"] is not None:
            rows += len(r["live_labels"])
            agree += sum(a == b for a, b in zip(r["live_labels"], r["candidate_labels"]))
    agreement = agree / rows if rows else 0.0
    p99 = {role: float(np.percentile([r[f"{role}_ms"] for r in records], 99)) if records else float("nan")
           for role in ("live", "candidate")}
    failures = sum(r["candidate_status"] != 200 for r in records)
    reasons = []
    if len(records) < min_requests:
        reasons.append(f"only {len(records)} requests compared (need {min_requests})")
    if failures:
        reasons.append(f"{failures} candidate answers were not 200")
    if agreement < min_agreement:
        reasons.append(f"labels agree on {agreement:.1%} of rows (need {min_agreement:.0%})")
    if not p99["candidate"] <= max_p99_ratio * p99["live"]:
        reasons.append(f"candidate p99 {p99['candidate']:.1f} ms > {max_p99_ratio} x live {p99['live']:.1f} ms")
    return {"decision": "roll back" if reasons else "promote", "reasons": reasons, "requests": len(records),
            "rows": rows, "agreement": agreement, "live_p99_ms": p99["live"], "candidate_p99_ms": p99["candidate"],
            "candidate_failures": failures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Shadow a candidate server behind a live one and apply the rule.")
    parser.add_argument("--live", required=True, help="URL of the live version, e.g. http://127.0.0.1:8000")
    parser.add_argument("--candidate", required=True, help="URL of the candidate version")
    parser.add_argument("--requests", type=int, default=RULE["min_requests"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import numpy as np

    rng = np.random.default_rng(args.seed)
    bodies = [rng.integers(0, 17, size=(4, 64)).astype("<f4").tobytes() for _ in range(args.requests)]
    print(json.dumps(decide(shadow(args.live, args.candidate, bodies))))


if __name__ == "__main__":
    main()
