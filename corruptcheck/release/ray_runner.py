"""The units of `corruptcheck check` as Ray tasks (docs/checkpoints.md, "On a Ray cluster").

Each unit is one task (`layer_check.check_unit`) asking for one CPU and its memory estimate
(check.memory_estimate, capped at the largest node's memory). The driver reads a unit's engine
tensors from the dump when it submits the unit and puts each into the object store once: a
tensor that two units read (layer i's output is layer i+1's input) is one object passed to
both by reference, and the driver drops its reference when no pending unit needs it, so
neither the driver nor the object store holds the whole dump. At most two tasks per cluster
CPU are in flight. Results stream back as they finish (`on_done`, the progress bar).

A unit whose worker died (killed, out of memory, node lost) is submitted again, up to
MAX_ATTEMPTS in all; one that still fails, or raised, is returned unchecked with the reason.
Workers need corruptcheck installed and the checkpoint at the same path (a shared file
system or a copy on every node), as an engine needs its weights.
"""
from __future__ import annotations

from collections import Counter

from corruptcheck.errors import BadInput, one_line
from corruptcheck.release.unit_check import UnitResult, check_unit

MAX_ATTEMPTS = 3


def connect(address: str) -> dict:
    """Join the cluster at `address`; "auto": a running cluster if there is one, else start a
    local one on this machine. Returns what the cluster has."""
    try:
        import ray
    except ImportError:
        raise BadInput("--ray needs Ray: pip install 'corruptcheck[ray]'") from None
    if not ray.is_initialized():
        try:
            if address == "auto":
                try:
                    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
                except ConnectionError:
                    ray.init(logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise BadInput(f"--ray {address}: cannot join a Ray cluster ({one_line(exc)})") from None
    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"address": address, "nodes": len(nodes), "cpus": int(res.get("CPU", 0)),
            "largest_node_memory": max((int(n["Resources"].get("memory", 0)) for n in nodes), default=0)}


def run_on_ray(address: str, root: str, jobs: list, points, sequences, precision: str, on_done) -> tuple[dict, dict]:
    import ray
    from ray.exceptions import RayTaskError

    cluster = connect(address)
    task = ray.remote(num_cpus=1, max_retries=0)(check_unit)
    cap = int(cluster["largest_node_memory"] * 0.9) or None
    pending = list(jobs)
    users = Counter(n for job in jobs for n in job.names)  # units still to run that read each tensor
    refs: dict = {}  # tensor name -> object ref, while a pending unit needs it
    attempts: Counter = Counter()
    running: dict = {}  # object ref of the result -> job
    results: dict = {}

    def submit(job) -> None:
        for n in job.names:
            if n not in refs:
                refs[n] = ray.put(points[n])
        attempts[job.unit] += 1
        memory = min(job.memory, cap) if cap else job.memory
        ref = task.options(memory=memory).remote(root, job.unit, job.names, sequences, precision,
                                                 *[refs[n] for n in job.names])
        running[ref] = job

    def finish(job, res: UnitResult) -> None:
        res.attempts = attempts[job.unit]
        results[job.unit] = res
        for n in job.names:
            users[n] -= 1
            if users[n] == 0:
                refs.pop(n, None)
        on_done(res)

    window = max(2, 2 * cluster["cpus"])
    while pending or running:
        while pending and len(running) < window:
            submit(pending.pop(0))
        done, _ = ray.wait(list(running), num_returns=1)
        job = running.pop(done[0])
        try:
            finish(job, ray.get(done[0]))
        except RayTaskError as exc:  # the unit's own code raised: deterministic, not retried
            finish(job, UnitResult(job.unit, error=f"raised {one_line(exc.cause or exc)}"))
        except ray.exceptions.RayError as exc:  # the worker or its node died: try again elsewhere
            if attempts[job.unit] < MAX_ATTEMPTS:
                submit(job)
            else:
                finish(job, UnitResult(job.unit, error=f"worker lost {attempts[job.unit]} times "
                                                       f"(last: {type(exc).__name__}: {one_line(exc)})"))
    return results, cluster
